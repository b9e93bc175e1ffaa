"""The Redis Function library: publishing into the log from any Redis client.

``FCALL <prefix>_publish 0 <topic> <data> [event] [retry] [private]`` appends one event to
``<prefix>:log`` and returns its id, after the checks ``broker.event.make_draft`` makes
on the HTTP path, so an event written this way is indistinguishable from one published
over HTTP: same fields (``stored_fields``), same ``MAXLEN ~``, same limits. It takes no
idempotency key and no chosen ``id``: such an event's id is always its entry id.

The library is generated per prefix (the function's name carries it, and so does the
library's, so that brokers with different prefixes on one Redis do not replace each
other's) with the node's limits baked in, and every node loads it with
``FUNCTION LOAD REPLACE`` at start-up and after every reconnect: loading is idempotent,
and a Redis that came back empty gets it again. When nodes run with different limits,
the last one to load wins. The library name carries a version (``LIBRARY_VERSION``);
a new version must first delete the old library, whose function has the same name.

Argument conventions, which differ from JSON only where positional arguments force it:
``topic`` may be several topics joined by ``\\n`` (a topic cannot contain a line feed);
an empty ``event`` or ``retry`` means none, so that ``retry`` can be given without an
``event``; ``retry`` is decimal digits; ``private`` is ``1`` for a private event (``0`` or empty for
a public one). Lengths are counted in code points, as Python
counts them, and strings must be valid UTF-8 (no surrogates, no overlong forms).
"""

from __future__ import annotations

from broker.event import ID_ALLOWANCE, MAX_RETRY_MS, MAX_TYPE_LENGTH, RESERVED_TYPE_PREFIX
from broker.topics import MAX_TOPIC_LENGTH

LIBRARY_VERSION = 1


def library_name(prefix: str) -> str:
    return f"sse_broker_v{LIBRARY_VERSION}_{prefix}"


def publish_function_name(prefix: str) -> str:
    return f"{prefix}_publish"


def _lua_string(text: str) -> str:
    """A Lua string literal for ``text`` (prefixes and constants: ASCII, no quotes)."""
    if not text.isascii() or "'" in text or "\\" in text:
        raise ValueError(f"not a plain Lua literal: {text!r}")
    return f"'{text}'"


def library_source(prefix: str, *, max_events: int, max_topics: int, max_event_bytes: int) -> str:
    """The library's Lua source for ``prefix`` and these limits."""
    constants = {
        "LOG_KEY": _lua_string(f"{prefix}:log"),
        "MAX_EVENTS": str(max_events),
        "MAX_TOPICS": str(max_topics),
        "MAX_EVENT_BYTES": str(max_event_bytes),
        "ID_ALLOWANCE": str(ID_ALLOWANCE),
        "MAX_TOPIC_LENGTH": str(MAX_TOPIC_LENGTH),
        "MAX_TYPE_LENGTH": str(MAX_TYPE_LENGTH),
        "MAX_RETRY_MS": str(MAX_RETRY_MS),
        "RESERVED_PREFIX": _lua_string(RESERVED_TYPE_PREFIX),
        "FUNCTION_NAME": _lua_string(publish_function_name(prefix)),
    }
    header = f"#!lua name={library_name(prefix)}\n"
    definitions = "".join(f"local {name} = {value}\n" for name, value in constants.items())
    return header + definitions + _BODY


_BODY = r"""
-- Code points in s, or nil when s is not valid UTF-8 as Python's strict decoder sees it.
local function utf8_length(s)
  if not s:find('[\128-\255]') then
    return #s
  end
  local byte = string.byte
  local count, i, n = 0, 1, #s
  while i <= n do
    local c = byte(s, i)
    if c < 0x80 then
      i = i + 1
    elseif c >= 0xC2 and c <= 0xDF then
      local c2 = byte(s, i + 1)
      if not c2 or c2 < 0x80 or c2 > 0xBF then return nil end
      i = i + 2
    elseif c >= 0xE0 and c <= 0xEF then
      local c2, c3 = byte(s, i + 1, i + 2)
      if not c3 then return nil end
      local lo, hi = 0x80, 0xBF
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
      if c2 < lo or c2 > hi or c3 < 0x80 or c3 > 0xBF then return nil end
      i = i + 3
    elseif c >= 0xF0 and c <= 0xF4 then
      local c2, c3, c4 = byte(s, i + 1, i + 3)
      if not c4 then return nil end
      local lo, hi = 0x80, 0xBF
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
      if c2 < lo or c2 > hi or c3 < 0x80 or c3 > 0xBF or c4 < 0x80 or c4 > 0xBF then
        return nil
      end
      i = i + 4
    else
      return nil
    end
    count = count + 1
  end
  return count
end

local function invalid(message)
  return redis.error_reply('ERR invalid event: ' .. message)
end

local function count(s, pattern)
  local _, found = s:gsub(pattern, '')
  return found
end

-- The size of the event's SSE encoding without its id line (sse.encode_body).
local function body_size(data, event, retry)
  local size = 1
  if event then size = size + 8 + #event end
  if retry then size = size + 8 + #retry end
  local crlf = count(data, '\r\n')
  local breaks = count(data, '\r') + count(data, '\n') - crlf
  local break_bytes = breaks + crlf
  return size + #data - break_bytes + 7 * (breaks + 1)
end

local function check_topic(topic)
  if topic == '' then return 'topic must not be empty' end
  -- More bytes than four per character: too long whatever they hold; and no scan of them.
  local length = MAX_TOPIC_LENGTH + 1
  if #topic <= 4 * MAX_TOPIC_LENGTH then length = utf8_length(topic) end
  if not length then return 'topic is not valid UTF-8' end
  if length > MAX_TOPIC_LENGTH then
    return 'topic is longer than ' .. MAX_TOPIC_LENGTH .. ' characters'
  end
  if topic:find('[%z\1-\31\127]') then return 'topic must not contain control characters' end
  for segment in (topic .. '/'):gmatch('([^/]*)/') do
    if segment == '*' or segment == '**' then
      return "topic '" .. topic .. "' has a wildcard segment; wildcards are for subscribing"
    end
  end
  return nil
end

local function publish(keys, args)
  if #keys ~= 0 then
    return invalid('pass 0 keys: FCALL ' .. FUNCTION_NAME
      .. ' 0 <topic> <data> [event] [retry] [private]')
  end
  if #args < 2 then return invalid("'topic' and 'data' are required") end
  if #args > 5 then return invalid('expected <topic> <data> [event] [retry] [private]') end
  local topic_arg, data, event, retry, private = args[1], args[2], args[3], args[4], args[5]
  if private == '' or private == '0' then
    private = nil
  elseif private and private ~= '1' then
    return invalid("'private' must be 1 (private), 0 or empty (public)")
  end

  local topics, seen = {}, {}
  for topic in (topic_arg .. '\n'):gmatch('([^\n]*)\n') do
    local problem = check_topic(topic)
    if problem then return invalid(problem) end
    if not seen[topic] then
      seen[topic] = true
      topics[#topics + 1] = topic
    end
  end
  if #topics > MAX_TOPICS then
    return invalid('an event may have at most ' .. MAX_TOPICS .. ' topics')
  end

  if event == '' then event = nil end
  if event then
    -- As for topics: more than four bytes per character is too long, without a scan.
    local length = MAX_TYPE_LENGTH + 1
    if #event <= 4 * MAX_TYPE_LENGTH then length = utf8_length(event) end
    if not length then return invalid("'event' is not valid UTF-8") end
    if length > MAX_TYPE_LENGTH then
      return invalid("'event' is longer than " .. MAX_TYPE_LENGTH .. ' characters')
    end
    if event:sub(1, #RESERVED_PREFIX) == RESERVED_PREFIX then
      return invalid("event types starting with '" .. RESERVED_PREFIX .. "' are reserved")
    end
  end

  if retry == '' then retry = nil end
  if retry then
    local number = tonumber(retry)
    if not retry:find('^%d+$') or #retry > 12 or number > MAX_RETRY_MS then
      return invalid("'retry' must be an integer from 0 to " .. MAX_RETRY_MS)
    end
    retry = string.format('%d', number)
  end
  -- After the retry check, as sse.encode_body checks it after make_draft's checks.
  if event and event:find('[\r\n%z]') then
    return invalid('event must not contain CR, LF or NUL')
  end

  local size = body_size(data, event, retry)
  if size + ID_ALLOWANCE > MAX_EVENT_BYTES then
    return redis.error_reply('ERR too large: encoded event is ' .. size
      .. ' bytes; the limit is ' .. MAX_EVENT_BYTES)
  end
  -- Last, so that an oversized payload is refused without scanning it byte by byte.
  if not utf8_length(data) then return invalid("'data' is not valid UTF-8") end

  local command = {'XADD', LOG_KEY, 'MAXLEN', '~', MAX_EVENTS, '*',
    'topics', table.concat(topics, '\n'), 'data', data}
  if event then
    command[#command + 1] = 'event'
    command[#command + 1] = event
  end
  if retry then
    command[#command + 1] = 'retry'
    command[#command + 1] = retry
  end
  if private then
    command[#command + 1] = 'private'
    command[#command + 1] = '1'
  end
  return redis.call(unpack(command))
end

redis.register_function(FUNCTION_NAME, publish)
"""
