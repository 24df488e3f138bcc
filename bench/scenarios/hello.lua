-- The ceiling: bench/hello.py's bare endpoint under the same gunicorn configuration.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
common.run(function()
  return "GET", "/"
end)
