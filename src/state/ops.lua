-- mailgate's one store script (src/state/redis.rs runs it with EVALSHA).
-- Runs the ops of one call in order, atomically: no read-modify-write race
-- between instances. Time is the store's (TIME), so instances whose clocks
-- differ still agree.
--
-- KEYS[i] is op i's key. ARGV[1] = this call's token (its lease member),
-- ARGV[2] = lease TTL in ms, then 5 values per op: kind, a, b, c, d.
-- An op that refuses with its stop flag set ends the call: leases this call
-- took are given back and the answers so far are returned.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local token = ARGV[1]
local lease_ttl = tonumber(ARGV[2])
local out = {}
local taken = {}
local good = false
for i = 1, #KEYS do
  local key = KEYS[i]
  local base = 2 + (i - 1) * 5
  local kind = ARGV[base + 1]
  local a = tonumber(ARGV[base + 2])
  local b = tonumber(ARGV[base + 3])
  local c = ARGV[base + 4]
  local d = ARGV[base + 5]
  local r = 0
  local stop = false
  if kind == 'rate' then
    -- GCRA: a = µs per cell, b = burst tolerance in µs, c = stop flag
    local tat = tonumber(redis.call('GET', key) or now_us)
    if tat < now_us then tat = now_us end
    local nxt = tat + a
    if nxt - now_us > b then
      r = nxt - now_us - b
      stop = c == '1'
    else
      redis.call('SET', key, string.format('%.0f', nxt), 'PX', math.floor((nxt - now_us) / 1000) + 1)
    end
  elseif kind == 'lease' then
    -- a = max live leases, c = stop flag
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= a then
      r = 1
      stop = c == '1'
    else
      redis.call('ZADD', key, now + lease_ttl, token)
      redis.call('PEXPIRE', key, lease_ttl)
      taken[#taken + 1] = key
    end
  elseif kind == 'renew' then
    -- c = lease member (a live session of this instance)
    redis.call('ZADD', key, now + lease_ttl, c)
    redis.call('PEXPIRE', key, lease_ttl)
  elseif kind == 'release' then
    redis.call('ZREM', key, c)
  elseif kind == 'good' then
    -- a = trust in ms
    local v = redis.call('GET', key)
    if v and now - tonumber(v) < a then
      good = true
      r = 1
    end
  elseif kind == 'locked' then
    -- a = max failures, b = window in ms, c = stop flag, d = '1': spare when good
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - b)
    if redis.call('ZCARD', key) >= a then
      if d == '1' and good then
        r = -1
      else
        local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
        r = b - (now - tonumber(oldest[2]))
        if r < 1 then r = 1 end
        stop = c == '1'
      end
    end
  elseif kind == 'fail' then
    -- a = max failures kept, b = window in ms
    redis.call('ZADD', key, now, token .. ':' .. i .. ':' .. now_us)
    redis.call('ZREMRANGEBYRANK', key, 0, -(a + 1))
    redis.call('PEXPIRE', key, b)
  elseif kind == 'remember' then
    -- a = TTL in ms
    redis.call('SET', key, now, 'PX', a)
  elseif kind == 'put' then
    -- TTL set: a = TTL in ms, c = member, d = value; expired members pruned.
    -- A member already expiring later keeps its expiry and value (a new ban
    -- never shortens a longer one, as in process: policy/bans.rs)
    local cur = redis.call('ZSCORE', key, c)
    if not cur or tonumber(cur) < now + a then
      redis.call('ZADD', key, now + a, c)
      redis.call('HSET', key .. ':v', c, d)
    end
    local old = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, 64)
    for _, m in ipairs(old) do
      redis.call('ZREM', key, m)
      redis.call('HDEL', key .. ':v', m)
    end
    -- b = at most this many members: past it, the others expiring soonest
    -- make room (many banned networks must not grow the store without bound)
    local over = redis.call('ZCARD', key) - b
    if over > 0 then
      local soonest = redis.call('ZRANGE', key, 0, over)
      for _, m in ipairs(soonest) do
        if over > 0 and m ~= c then
          redis.call('ZREM', key, m)
          redis.call('HDEL', key .. ':v', m)
          over = over - 1
        end
      end
    end
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    local ttl = tonumber(last[2]) - now + 1
    redis.call('PEXPIRE', key, ttl)
    redis.call('PEXPIRE', key .. ':v', ttl)
  elseif kind == 'get' then
    -- c = member: {remaining ms, value} or 0
    local s = redis.call('ZSCORE', key, c)
    if s and tonumber(s) > now then
      r = {tonumber(s) - now, redis.call('HGET', key .. ':v', c) or ''}
    end
  elseif kind == 'remove' then
    -- 1 when a live member was removed (the lift answers how many)
    local s = redis.call('ZSCORE', key, c)
    redis.call('ZREM', key, c)
    redis.call('HDEL', key .. ':v', c)
    if s and tonumber(s) > now then r = 1 end
  elseif kind == 'list' then
    -- a = at most this many: {member, value, remaining ms, ...}
    local live = redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, a)
    r = {}
    for j = 1, #live, 2 do
      r[#r + 1] = live[j]
      r[#r + 1] = redis.call('HGET', key .. ':v', live[j]) or ''
      r[#r + 1] = tonumber(live[j + 1]) - now
    end
  else
    return redis.error_reply('mailgate: unknown op ' .. tostring(kind))
  end
  out[i] = r
  if stop then
    for _, k in ipairs(taken) do
      redis.call('ZREM', k, token)
    end
    return out
  end
end
return out
