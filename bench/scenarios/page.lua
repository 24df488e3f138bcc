-- GET the default (newest first) page of 50 tasks.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
common.run(common.page)
