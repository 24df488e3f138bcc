"""`make bench`: load benchmarks of todo-api over HTTP with wrk (see bench/README.md)."""
