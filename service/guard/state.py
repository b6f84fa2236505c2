"""Where the per-client state lives: in this process (`MemoryState`), or in Redis (`RedisState`), shared by every
service process that names the same `state_url`. Both answer the same two calls with the same rules:

    admit(client, n, now)                    → None, or raises Throttled (detected, rate, budget; nothing charged)
    observe(client, fps, digests, now)       → Verdict (service.guard.detector), remembering the queries

Redis layout (prefix `mg:guard:`; standalone Redis: the scripts touch keys they compute, which a cluster refuses):
`a:<client>` hash (tokens, ts, used, start), `d:<client>` = detected-until (expires with the cooldown),
`c:<client>` hash (count, carried), `cf:<client>` its last `history` match flags, `cq:<client>` its last `history`
query ids; `seq` the query counter; the hash index `x:<b>` (b = hash mod B, B = the power of two ≥
stream_history · top_k / depth), a string of 8-byte records (hash, query id), the last 2·depth kept; `m:<id // 128>`
a hash of query id → "<client>|<digest>". A stored query counts while it is among the last `stream_history` ids or
among its client's own last `history` (as long as its records are kept). Keys expire after `ttl_s` without writes.
Each call is one Lua script — one round trip per request, atomic across processes. Memory is bounded by the
index: B · (2·depth · 8 B + ≈ 100 B per key); measured ≈ 2 kB per stream query once it is full (19 MB at
stream_history 10,000, bench/guard.py --sections redis), so ≈ 200 MB at the default 100,000.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np

from service.config import ClientSettings
from service.guard import limits
from service.guard.detector import BlacklightConfig, History, StreamIndex, Verdict, buckets
from service.guard.limits import Allowance, Limits

PREFIX = "mg:guard:"


class ClientState(Allowance):
    """One tracked client: its allowance, detected-until time and (once it queried) its detector history."""

    __slots__ = ("detected_until", "history")

    def __init__(self) -> None:
        super().__init__()
        self.detected_until = 0.0
        self.history: History | None = None


class MemoryState:
    """In-process state: at most `max_clients` clients (least recently seen evicted) and the stream index.
    Not thread-safe: the caller holds a lock."""

    backend = "memory"

    def __init__(self, settings: ClientSettings, cfg: BlacklightConfig) -> None:
        self.settings, self.cfg, self.limits = settings, cfg, Limits.from_settings(settings)
        self.clients: OrderedDict[str, ClientState] = OrderedDict()
        self.stream = StreamIndex(settings.stream_history, cfg.top_k, cfg.depth) if settings.detector else None

    def client(self, name: str) -> ClientState:
        st = self.clients.get(name)
        if st is None:
            st = self.clients[name] = ClientState()
            while len(self.clients) > max(self.settings.max_clients, 1):
                self.clients.popitem(last=False)
        else:
            self.clients.move_to_end(name)
        return st

    def admit(self, client: str, n: int, now: float) -> None:
        st = self.client(client)
        if st.detected_until > now:
            raise limits.detected(st.detected_until - now)
        limits.admit(st, n, now, self.limits)

    def observe(self, client: str, fps: np.ndarray, digests: np.ndarray, now: float) -> Verdict:
        assert self.stream is not None
        st, cfg = self.client(client), self.cfg
        h = st.history = st.history or History(self.settings.history, cfg.top_k)
        matched_n = 0
        for fp, digest in zip(fps, digests, strict=True):
            slots = self.stream.matches(fp, digest, cfg.threshold)
            peer = False
            for owner in {self.stream.owners[s] for s in slots} - {client, None}:
                other = self.clients.get(owner)  # type: ignore[arg-type]  # no LRU touch
                if other is not None and other.history is not None:
                    h.carried = max(h.carried, other.history.score)
                    peer |= other.detected_until > now
            matched = len(slots) > 0 or h.matches(fp, digest, cfg.threshold)
            h.push(fp, digest, matched)
            self.stream.add(fp, digest, client)
            matched_n += matched
            if matched and (peer or h.score >= cfg.matches):
                st.detected_until = now + self.settings.cooldown_s
                return Verdict(True, "peer" if peer else "matches", h.score, matched_n)
        return Verdict(False, None, h.score, matched_n)

    def close(self) -> None:
        pass


ADMIT = """
local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate, burst, budget, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local until_ = tonumber(redis.call('GET', KEYS[2]) or '0')
if until_ > now then return {'detected', tostring(until_ - now)} end
local a = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'used', 'start')
local tokens = burst
if a[2] then tokens = math.min(burst, tonumber(a[1]) + math.max(now - tonumber(a[2]), 0) * rate) end
local used, start = tonumber(a[3]) or 0, tonumber(a[4])
if not start or now >= start + window then used, start = 0, now end
local need = math.min(n, burst)
if rate > 0 and tokens < need then return {'rate', tostring((need - tokens) / rate)} end
if budget > 0 and used + n > budget then return {'budget', tostring(start + window - now)} end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - n), 'ts', tostring(now), 'used', used + n,
           'start', tostring(start))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
return {'ok', '0'}
"""

OBSERVE = """
local p, client, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local T, K, H, S = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local cap, ttl, cool, k, B = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]),
                             tonumber(ARGV[12])
local W = 4294967296
local ck, fk, qk = p .. 'c:' .. client, p .. 'cf:' .. client, p .. 'cq:' .. client
local own = {}
for _, q in ipairs(redis.call('LRANGE', qk, 0, -1)) do own[tonumber(q)] = true end
local st = redis.call('HMGET', ck, 'count', 'carried')
local count, carried = tonumber(st[1]) or 0, tonumber(st[2]) or 0
local matched_n, detected, reason = 0, 0, ''
for base = 13, #ARGV, k + 1 do
  local digest = ARGV[base]
  local id = redis.call('INCR', p .. 'seq') % W
  local mine, order = {}, {}
  for j = base + 1, base + k do
    local h = tonumber(ARGV[j])
    if h ~= 0 then
      local b = h % B
      if not mine[b] then mine[b] = {}; order[#order + 1] = b end
      mine[b][h] = true
    end
  end
  local counts, old = {}, {}
  for _, b in ipairs(order) do
    local v = redis.call('GET', p .. 'x:' .. b) or ''
    old[b] = v
    for pos = 1, #v, 8 do
      local h, q = struct.unpack('<I4I4', v, pos)
      if mine[b][h] then counts[q] = (counts[q] or 0) + 1 end
    end
  end
  local matched, peer = false, false
  for q, c in pairs(counts) do
    local age = (id - q) % W
    if c > T and ((age > 0 and age <= S) or own[q]) then
      local meta = redis.call('HGET', p .. 'm:' .. math.floor(q / 128), q % 128)
      if meta then
        local cut = string.find(meta, '|', 1, true)
        local owner = string.sub(meta, 1, cut - 1)
        if string.sub(meta, cut + 1) ~= digest then
          matched = true
          if owner ~= client then
            local o = redis.call('HMGET', p .. 'c:' .. owner, 'count', 'carried')
            carried = math.max(carried, (tonumber(o[1]) or 0) + (tonumber(o[2]) or 0))
            if tonumber(redis.call('GET', p .. 'd:' .. owner) or '0') > now then peer = true end
          end
        end
      end
    end
  end
  for _, b in ipairs(order) do
    local recs = {old[b]}
    for h in pairs(mine[b]) do recs[#recs + 1] = struct.pack('<I4I4', h, id) end
    local v = table.concat(recs)
    if #v > cap * 8 then v = string.sub(v, #v - cap * 8 + 1) end
    redis.call('SET', p .. 'x:' .. b, v, 'EX', ttl)
  end
  local mk = p .. 'm:' .. math.floor(id / 128)
  redis.call('HSET', mk, id % 128, client .. '|' .. digest)
  redis.call('EXPIRE', mk, ttl)
  redis.call('LPUSH', qk, id)
  redis.call('LTRIM', qk, 0, H - 1)
  own[id] = true
  local flag = matched and 1 or 0
  redis.call('LPUSH', fk, flag)
  if redis.call('LLEN', fk) > H then count = count - tonumber(redis.call('RPOP', fk)) end
  count = count + flag
  matched_n = matched_n + flag
  if matched and (peer or count + carried >= K) then
    detected, reason = 1, peer and 'peer' or 'matches'
    redis.call('SET', p .. 'd:' .. client, tostring(now + cool), 'PX', math.max(math.floor(cool * 1000), 1))
    break
  end
end
redis.call('HSET', ck, 'count', count, 'carried', carried)
for _, key in ipairs({ck, fk, qk}) do redis.call('EXPIRE', key, ttl) end
return {detected, reason, count + carried, matched_n}
"""


class RedisState:
    """The same state in Redis (see the module doc); every failure surfaces as a redis.RedisError or OSError."""

    backend = "redis"

    def __init__(self, url: str, settings: ClientSettings, cfg: BlacklightConfig, timeout_s: float = 0.05,
                 prefix: str = PREFIX, ttl_s: float | None = None) -> None:  # fmt: skip
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as e:
            raise RuntimeError("MG_STATE_URL needs the redis client: pip install -e '.[state]'") from e

        self.settings, self.cfg, self.limits, self.prefix = settings, cfg, Limits.from_settings(settings), prefix
        self.ttl = int(ttl_s or max(settings.budget_window_s, settings.cooldown_s, 60.0))
        self.buckets = buckets(settings.stream_history * cfg.top_k / cfg.depth)
        self.r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0), health_check_interval=0)  # fmt: skip
        self._admit = self.r.register_script(ADMIT)
        self._observe = self.r.register_script(OBSERVE)

    def secret(self) -> bytes:
        """The deployment's fingerprint key: created by the first process that asks, read by the others."""
        key = self.prefix + "secret"
        self.r.set(key, os.urandom(32), nx=True)
        value = self.r.get(key)
        if not value:
            raise OSError("the fingerprint secret vanished from Redis")
        return bytes(value)

    def admit(self, client: str, n: int, now: float) -> None:
        lim = self.limits
        ttl = int(max(lim.budget_window_s, lim.burst / lim.rate_per_s if lim.rate_per_s > 0 else 0, 1)) + 1
        keys = [f"{self.prefix}a:{client}", f"{self.prefix}d:{client}"]
        args = [repr(now), n, lim.rate_per_s, lim.burst, lim.budget, lim.budget_window_s, ttl]
        reason, value = (v.decode() for v in self._admit(keys=keys, args=args))
        retry = float(value)
        if reason == "detected":
            raise limits.detected(retry)
        if reason == "rate":
            raise limits.rate_exceeded(n, retry, lim)
        if reason == "budget":
            raise limits.budget_exceeded(n, retry, lim)

    def observe(self, client: str, fps: np.ndarray, digests: np.ndarray, now: float) -> Verdict:
        s, cfg = self.settings, self.cfg
        args: list[Any] = [self.prefix, client, repr(now), cfg.threshold, cfg.matches, max(s.history, 1),
                           max(s.stream_history, 1), 2 * cfg.depth, self.ttl, s.cooldown_s, cfg.top_k,
                           self.buckets]  # fmt: skip
        for fp, digest in zip(fps, digests, strict=True):
            args.append(str(int(digest)))
            args.extend(fp.tolist())
        detected, reason, score, matched = self._observe(keys=[], args=args)
        return Verdict(bool(detected), reason.decode() or None, int(score), int(matched))

    def close(self) -> None:
        self.r.close()
