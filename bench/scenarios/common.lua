-- Shared plumbing for the wrk scenario scripts; each script calls run(build) with its own request builder.
--
-- Environment (set by bench/run.py):
--   BENCH_DATA         Lua file returning {users = {{id=, auth=, tasks={...}}, ...}, titles = {...}}
--   BENCH_RATE         total requests/s over all connections: fixed-rate mode. Unset: saturation.
--   BENCH_CONNECTIONS  connections in fixed-rate mode; run wrk with as many threads, one connection each.
--
-- done() prints one line, "BENCH_RESULT " followed by JSON: status counts (from response(), per thread,
-- summed), socket errors (summary.errors), the requests written (from request(): wrk counts a timeout only
-- for a response that comes late, so a request never answered shows only as sent minus summary.requests),
-- wrk's latency percentiles and, in fixed-rate mode, the latency measured from each request's scheduled send time.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]

local M = {}

local CLOCK_MONOTONIC = 1
local LATE_SLACK_US = 1000 -- a send more than 1 ms after its slot counts as late
local clock = ffi.new("bench_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) * 1e6 + tonumber(clock.tv_nsec) / 1e3
end

local data_file = os.getenv("BENCH_DATA")
local data = data_file and dofile(data_file) or {}
M.users = data.users or {}
M.titles = data.titles or { "Task" }
local rate = tonumber(os.getenv("BENCH_RATE") or "")
local connections = tonumber(os.getenv("BENCH_CONNECTIONS") or "1")

function M.pick(list)
  return list[math.random(#list)]
end

function M.tasks_path(user)
  return "/api/" .. user.id .. "/tasks"
end

function M.task_path(user)
  return M.tasks_path(user) .. "/" .. M.pick(user.tasks)
end

-- Requests shared by several scenarios (the mix reuses the single-purpose ones).
function M.get_one(user)
  return "GET", M.task_path(user)
end

function M.page(user)
  return "GET", M.tasks_path(user) .. "?page_size=50"
end

function M.create(user)
  -- The prefix lets bench/run.py delete what a round created.
  return "POST", M.tasks_path(user), '{"title":"bench-create ' .. math.random(1e6) .. '","priority":"high"}'
end

function M.update(user)
  -- A title from the seed vocabulary, so search matches stay statistically the same.
  return "PUT", M.task_path(user), '{"title":"' .. M.pick(M.titles) .. '"}'
end

function M.toggle(user)
  return "PATCH", M.task_path(user) .. "/complete"
end

local function json(value)
  if type(value) == "table" then
    local parts = {}
    for key, item in pairs(value) do
      parts[#parts + 1] = string.format("%q:%s", tostring(key), json(item))
    end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif type(value) == "number" then
    if value ~= value or value == math.huge or value == -math.huge then
      return "null" -- nan or inf, e.g. the mean latency of a run without responses
    end
    return string.format("%.3f", value)
  end
  return string.format("%q", tostring(value))
end

local function percentiles(sorted)
  local result = { count = #sorted }
  if #sorted == 0 then
    return result
  end
  for _, p in ipairs({ 50, 95, 99 }) do
    result["p" .. p] = sorted[math.max(1, math.ceil(#sorted * p / 100))]
  end
  result.max = sorted[#sorted]
  return result
end

-- Installs wrk's callbacks; build(user) returns method, path and an optional JSON body.
function M.run(build)
  local threads = {}

  function setup(thread)
    thread:set("thread_index", #threads)
    threads[#threads + 1] = thread
  end

  function init(_)
    math.randomseed(os.time() * 1000 + thread_index)
    statuses, latencies, late, sent = {}, {}, 0, 0
    -- The schedule starts with the thread, before its connection exists: a slow accept counts as latency.
    schedule_start = now_us()
  end

  function request()
    local user = #M.users > 0 and M.pick(M.users) or nil
    local method, path, body = build(user)
    local headers = {}
    if user then
      headers["Authorization"] = user.auth
    end
    if body then
      headers["Content-Type"] = "application/json"
    end
    -- On schedule, latency counts from the actual send (timer slack is the client's, not the server's);
    -- behind schedule, from the slot it should have gone out in, so a slow server cannot hide its backlog.
    started = (behind and slot) or now_us()
    sent = sent + 1
    return wrk.format(method, path, headers, body)
  end

  function response(status, _, _)
    statuses[status] = (statuses[status] or 0) + 1
    if rate then
      latencies[#latencies + 1] = now_us() - started
    end
  end

  if rate then
    -- Each connection sends on its own fixed schedule, the connections' schedules evenly interleaved.
    local interval = 1e6 * connections / rate
    local next_slot

    function delay()
      local now = now_us()
      next_slot = next_slot or (schedule_start + interval * thread_index / connections)
      slot, next_slot = next_slot, next_slot + interval
      behind = now - slot > LATE_SLACK_US
      if behind then
        late = late + 1
      end
      return math.max(0, math.ceil((slot - now) / 1000))
    end
  end

  function done(summary, latency, _)
    local counts, scheduled, late_sends, sent_total = {}, {}, 0, 0
    for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses")) do
        counts[status] = (counts[status] or 0) + count
      end
      for _, value in ipairs(thread:get("latencies")) do
        scheduled[#scheduled + 1] = value
      end
      late_sends = late_sends + thread:get("late")
      sent_total = sent_total + thread:get("sent")
    end
    table.sort(scheduled)
    local result = {
      requests = summary.requests,
      duration_us = summary.duration,
      errors = summary.errors,
      statuses = counts,
      late = late_sends,
      sent = sent_total,
      latency_us = {
        p50 = latency:percentile(50), p95 = latency:percentile(95), p99 = latency:percentile(99),
        max = latency.max, mean = latency.mean,
      },
    }
    if rate then
      result.scheduled_us = percentiles(scheduled)
    end
    io.write("BENCH_RESULT " .. json(result) .. "\n")
  end
end

return M
