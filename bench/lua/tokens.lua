-- wrk script: every request carries the next credential from a list file.
-- Usage: wrk -t1 ... -s tokens.lua URL -- FILE [PREFIX] [OFFSET] [once]
--   FILE    one token per line
--   PREFIX  header value prefix, default "Bearer "
--   OFFSET  index to start at (successive runs start at different tokens)
--   once    send each token exactly once, then stop the thread (cold path:
--           no token is ever sent twice, so none can be a cache hit).  wrk
--           itself divides by the full -d duration, so in this mode the script
--           prints its own "Once-Requests/sec:" over the time actually spent.
-- Without "once" the list is cycled for the whole run.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk, bench_timespec *ts);
]]
local function now()
  local ts = ffi.new("bench_timespec")
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

local threads = {}
function setup(thread) threads[#threads + 1] = thread end

tokens = {}
idx = 0
sent = 0
once = false
prefix = "Bearer "
t_first = 0
t_stop = 0

function init(args)
  local path = args[1]
  if args[2] ~= nil and args[2] ~= "" then prefix = args[2] end
  for line in io.lines(path) do
    if #line > 0 then tokens[#tokens + 1] = line end
  end
  if #tokens == 0 then error("no tokens in " .. tostring(path)) end
  idx = (tonumber(args[3] or "0") or 0) % #tokens
  once = (args[4] == "once")
end

function request()
  sent = sent + 1
  if sent == 1 then t_first = now() end
  if once and sent > #tokens then
    -- list exhausted: stop.  Requests still in flight are not counted, so
    -- every counted response belongs to a distinct token.
    if t_stop == 0 then t_stop = now() end
    wrk.thread:stop()
  end
  idx = idx % #tokens + 1
  return wrk.format(nil, nil, { ["Authorization"] = prefix .. tokens[idx] })
end

function done(summary, latency, requests)
  local elapsed = 0
  local is_once = false
  for _, t in ipairs(threads) do
    if t:get("once") then is_once = true end
    local a, b = t:get("t_first"), t:get("t_stop")
    if b and b > 0 and b - a > elapsed then elapsed = b - a end
  end
  if is_once then
    if elapsed > 0 then
      io.write(string.format("Once-Elapsed: %.3f\n", elapsed))
      io.write(string.format("Once-Requests/sec: %.2f\n", summary.requests / elapsed))
    else
      io.write("Once-Elapsed: not-exhausted (token list longer than the run)\n")
    end
  end
end
