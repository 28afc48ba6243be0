-- The envelope library, put before the body of every script that calls it (see scripts.py).
-- Elements of a private list and members of the retry set are envelopes,
-- `<PREFIX><id>:<attempts>:<payload>`: parsed and built here, and nowhere else in Lua.
--
-- Uses PREFIX, bound by the loader from scripts.PREFIX, which the Python side reads too.
-- Defines:
--   parse(element) -> id, attempts, payload; nil, 0, element for an element that is not
--     an envelope
--   wrap(id, attempts, payload) -> the envelope
-- A script need not use both:
-- luacheck: ignore 211

local function parse(element)
  if string.sub(element, 1, #PREFIX) ~= PREFIX then return nil, 0, element end
  local a = string.find(element, ':', #PREFIX + 1, true)
  local b = a and string.find(element, ':', a + 1, true)
  if not b then return nil, 0, element end
  local id, attempts = string.sub(element, #PREFIX + 1, a - 1), string.sub(element, a + 1, b - 1)
  -- Only what rqworkers wrote: its ids hold a dot, its attempts are digits. Anything else
  -- (written by hand, or by another program) is a payload that merely looks like an envelope.
  if not string.find(id, '.', 1, true) or not string.match(attempts, '^%d+$') then
    return nil, 0, element
  end
  return id, tonumber(attempts), string.sub(element, b + 1)
end

local function wrap(id, attempts, payload)
  return PREFIX .. id .. ':' .. attempts .. ':' .. payload
end
