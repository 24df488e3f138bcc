-- PUT a new title on an existing task.
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
common.run(common.update)
