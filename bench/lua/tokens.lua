-- wrk script: every request carries the next credential from a list file.
-- Usage: wrk -t1 ... -s tokens.lua URL -- FILE [PREFIX] [OFFSET] [once]
--   FILE    one token per line
--   PREFIX  header value prefix, default "Bearer "
--   OFFSET  index to start at (successive runs start at different tokens)
--   once    send each token exactly once, then stop the thread (cold path:
--           no token is ever sent twice, so none can be a cache hit)
-- Without "once" the list is cycled for the whole run.
local tokens = {}
local idx = 0
local sent = 0
local once = false
local prefix = "Bearer "

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
  if once and sent > #tokens then
    -- list exhausted: stop; the request built here is never answered in time
    -- to be counted (the thread's loop ends), and it reuses no cached entry
    -- that matters because the gateway under test is discarded afterwards.
    wrk.thread:stop()
  end
  idx = idx % #tokens + 1
  return wrk.format(nil, nil, { ["Authorization"] = prefix .. tokens[idx] })
end
