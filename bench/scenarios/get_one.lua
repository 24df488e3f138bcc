-- GET one task by id, a random user and one of that user's task ids per request.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
common.run(common.get_one)
