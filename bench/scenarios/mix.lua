-- 80% reads (GET one 40%, page of 50 40%), 20% writes (create 7%, update 7%, toggle 6%).
local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
common.run(function(user)
  local roll = math.random(100)
  if roll <= 40 then
    return common.get_one(user)
  elseif roll <= 80 then
    return common.page(user)
  elseif roll <= 87 then
    return common.create(user)
  elseif roll <= 94 then
    return common.update(user)
  end
  return common.toggle(user)
end)
