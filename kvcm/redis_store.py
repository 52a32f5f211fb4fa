"""The kvcm index kept in a Redis-protocol server (Redis >= 7, Valkey >= 7).

Key layout (llm-d's, so both can be inspected the same way; docs/redis.md):

    <model>@<key>                  hash: one field "<pod>@<tier>" per holder
    engine:<model>@<engine hash>   string "<model>@<key>" (",<model>@<key>"... when an engine
                                   block spans several kvcm blocks)

kvcm's own bookkeeping lives under `kvcm:`:

    kvcm:epoch:<model>             hash "<pod>@<tier>" -> the holder's current epoch token
    kvcm:count:<model>             hash "<pod>@<tier>" -> entries the holder has (an upper
                                   bound once TTLs or maxmemory evictions drop block keys)
    kvcm:ns:<model>                hash mode, style, lora, base: the namespace's hash contract
                                   (base: a LoRA's base model)
    kvcm:models                    set of namespaces
    kvcm:stream:<pod>@<model>@<dp rank>   hash seq, ts: the last batch applied
    kvcm:streams                   set of those stream ids
    kvcm:generation                counter behind fresh epoch tokens

A block field's value is the epoch token of its holder when it was stored; an entry counts
only while that token is current. Clearing a pod, a tier of a pod or a namespace is then one
new token (O(models)), not a scan of the index, and entries left behind are overwritten by the
next store or expire with their key's TTL. Tokens are never reused (time . counter), so even
a lost `kvcm:epoch:` hash cannot bring cleared entries back.

Both scripts run in one round trip each and are atomic. The apply script takes one event
batch: it advances the stream's sequence number by compare-and-set and skips the batch when
another replica already applied it, so replicas ingesting the same streams leave one state.
The lookup script walks a request's keys from block 0 and stops at the first block no
candidate pod holds. Scripts derive key names from their arguments: the server must hold
every kvcm key (a standalone server, or a proxy that sends scripts to one server).
"""

import asyncio
import collections
import hashlib
import logging
import time

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvcm.urls import redact_url

log = logging.getLogger("kvcm.redis")

_APPLY = r"""
local ttl = tonumber(ARGV[5])
local function fresh_token()
  local t = redis.call('TIME')
  return t[1] .. '.' .. redis.call('INCR', 'kvcm:generation')
end
local function epoch(model, field)
  local key = 'kvcm:epoch:' .. model
  local token = redis.call('HGET', key, field)
  if not token then
    token = fresh_token()
    redis.call('HSET', key, field, token)
    redis.call('SADD', 'kvcm:models', model)
  end
  return token
end
local function clear_pod(pod, tier, only_model)
  local models = only_model ~= '' and {only_model} or redis.call('SMEMBERS', 'kvcm:models')
  local cleared = 0
  for _, model in ipairs(models) do
    local epochs = redis.call('HGETALL', 'kvcm:epoch:' .. model)
    for j = 1, #epochs, 2 do
      local field = epochs[j]
      local at = field:match('^.*()@')           -- pods may hold '@', tiers do not
      if field:sub(1, at - 1) == pod and (tier == '' or field:sub(at + 1) == tier) then
        redis.call('HSET', 'kvcm:epoch:' .. model, field, fresh_token())
        cleared = cleared + (tonumber(redis.call('HGET', 'kvcm:count:' .. model, field)) or 0)
        redis.call('HDEL', 'kvcm:count:' .. model, field)
      end
    end
  end
  return cleared
end

-- the stream's sequence number, by compare-and-set
local status = 1
local added, removed = 0, 0
if ARGV[1] ~= '' then
  local key = 'kvcm:stream:' .. ARGV[1]
  local seq, ts = tonumber(ARGV[2]), tonumber(ARGV[3])
  local new_seq, new_ts = ARGV[2], ARGV[3]     -- kept as sent: a duplicate compares equal
  local last = redis.call('HMGET', key, 'seq', 'ts')
  if last[1] then
    local last_seq, last_ts = tonumber(last[1]), tonumber(last[2])
    if ARGV[4] == '1' then
      -- a resync re-applies retained history: the stream's position does not go back
      if seq < last_seq then new_seq = last[1] end
      if ts < last_ts then new_ts = last[2] end
    elseif ARGV[4] == '2' and ts > last_ts then
      status = 2                                  -- the ingest saw the engine restart
    elseif seq <= last_seq then
      if ts <= last_ts then return {0, 0, 0} end   -- applied already (here or by another replica)
      status = 2                                  -- an older seq with a newer batch: a new process
    elseif ts < last_ts - 1 then
      return {0, 0, 0}                            -- the previous process's batch, after a restart
    end
  end
  redis.call('HSET', key, 'seq', new_seq, 'ts', new_ts)
  if not last[1] then redis.call('SADD', 'kvcm:streams', ARGV[1]) end
  if status == 2 then removed = clear_pod(ARGV[6], '', '') end
end

local i = 7
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'S' or op == 'R' then
    local model, field = ARGV[i + 1], ARGV[i + 2]
    local token = epoch(model, field)
    local changed = 0
    for block in string.gmatch(ARGV[i + 3], '[^,]+') do
      local key = model .. '@' .. block
      if op == 'S' then
        -- most stores are of new entries: one call for those
        if redis.call('HSETNX', key, field, token) == 1 then
          changed = changed + 1
        elseif redis.call('HGET', key, field) ~= token then
          redis.call('HSET', key, field, token)    -- left by a clear: an entry again
          changed = changed + 1
        end
        if ttl > 0 then redis.call('EXPIRE', key, ttl) end
      else
        local held = redis.call('HGET', key, field)
        if held then
          redis.call('HDEL', key, field)
          if held == token then changed = changed - 1 end
        end
      end
    end
    if changed ~= 0 then redis.call('HINCRBY', 'kvcm:count:' .. model, field, changed) end
    if changed > 0 then added = added + changed else removed = removed - changed end
    i = i + 4
  elseif op == 'M' then
    -- engine hashes and, k per hash, their kvcm keys
    local model, k = ARGV[i + 1], tonumber(ARGV[i + 2])
    local keys = {}
    for block in string.gmatch(ARGV[i + 4], '[^,]+') do keys[#keys + 1] = model .. '@' .. block end
    local first = 1
    for engine_hash in string.gmatch(ARGV[i + 3], '[^,]+') do
      local value = table.concat(keys, ',', first, first + k - 1)
      if ttl > 0 then
        redis.call('SET', 'engine:' .. model .. '@' .. engine_hash, value, 'EX', ttl)
      else
        redis.call('SET', 'engine:' .. model .. '@' .. engine_hash, value)
      end
      first = first + k
    end
    i = i + 5
  elseif op == 'P' then
    removed = removed + clear_pod(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'N' then
    -- a switch to decoupled mode: parity entries cannot be re-keyed, so they go, once
    local model = ARGV[i + 1]
    if redis.call('HGET', 'kvcm:ns:' .. model, 'mode') ~= 'decoupled' then
      redis.call('DEL', 'kvcm:epoch:' .. model, 'kvcm:count:' .. model)
      redis.call('HSET', 'kvcm:ns:' .. model, 'mode', 'decoupled')
      redis.call('SADD', 'kvcm:models', model)
    end
    i = i + 2
  elseif op == 'T' then
    -- a namespace's contract; mode and style change one way only
    local key, mode, style = 'kvcm:ns:' .. ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local known = redis.call('HMGET', key, 'mode', 'style')
    if not known[1] or mode == 'decoupled' then redis.call('HSET', key, 'mode', mode) end
    if not known[2] or known[2] == 'unknown' then redis.call('HSET', key, 'style', style) end
    redis.call('HSET', key, 'lora', ARGV[i + 4])
    if ARGV[i + 5] ~= '' then redis.call('HSET', key, 'base', ARGV[i + 5]) end
    redis.call('SADD', 'kvcm:models', ARGV[i + 1])
    i = i + 6
  else
    return redis.error_reply('kvcm apply: unknown op ' .. tostring(op))
  end
end
return {status, added, removed}
"""

_LOOKUP = r"""
local model = ARGV[1]
local filter = nil
if ARGV[2] ~= '' then
  filter = {}
  for pod in string.gmatch(ARGV[2], '[^\n]+') do filter[pod] = true end
end
local weights = {}
local i = 3
local nweights = tonumber(ARGV[i]); i = i + 1
for j = i, i + 2 * nweights - 1, 2 do weights[ARGV[j]] = tonumber(ARGV[j + 1]) end
i = i + 2 * nweights
local default_weight = tonumber(ARGV[i])
local blocks = ARGV[i + 1]

local contract = redis.call('HMGET', 'kvcm:ns:' .. model, 'mode', 'style', 'lora')
-- Every current holder "<pod>@<tier>" of the model, parsed once into flat arrays indexed by
-- field number f (name, pod number, tier, weight, epoch token, blocks held in the run); the
-- walk below then allocates nothing per block but when a pod drops out.
local field_no, f_name, f_pod, f_tier, f_weight, f_token, f_count = {}, {}, {}, {}, {}, {}, {}
local pod_no, pods, pod_fields = {}, {}, {}
local epochs = redis.call('HGETALL', 'kvcm:epoch:' .. model)
for j = 1, #epochs, 2 do
  local field = epochs[j]
  local at = field:match('^.*()@')
  local pod = field:sub(1, at - 1)
  if filter == nil or filter[pod] then
    local p = pod_no[pod]
    if not p then
      p = #pods + 1
      pod_no[pod], pods[p], pod_fields[p] = p, pod, {}
    end
    local f = #f_pod + 1
    local tier = field:sub(at + 1)
    field_no[field], f_name[f] = f, field
    f_pod[f], f_tier[f], f_weight[f], f_token[f], f_count[f] = p, tier, weights[tier] or default_weight, epochs[j + 1], 0
    pod_fields[p][#pod_fields[p] + 1] = f
  end
end

local p_blocks, p_score, p_best, p_stamp = {}, {}, {}, {}
for p = 1, #pods do p_blocks[p], p_score[p], p_stamp[p] = 0, 0, -1 end
local depth = 0                      -- blocks walked so far
local held, nheld = {}, 0            -- the pods holding the current block
local order = {}                     -- pods in the order they were first seen
local function hit(f)
  local p = f_pod[f]
  if p_stamp[p] ~= depth then
    if depth > 0 and p_blocks[p] ~= depth then return end   -- its run ended before
    p_stamp[p], p_best[p] = depth, f_weight[f]
    nheld = nheld + 1
    held[nheld] = p
  elseif f_weight[f] > p_best[p] then
    p_best[p] = f_weight[f]
  end
  f_count[f] = f_count[f] + 1
end
-- after block 0 the walk asks each block only for the fields of the pods still in their
-- run (HMGET), and lists those again only when a pod drops out
local asked, asked_f, alive = nil, nil, -1
for block in string.gmatch(blocks, '[^,]+') do
  local key = model .. '@' .. block
  nheld = 0
  if asked == nil or #asked > 1000 then     -- (unpack has a limit; HGETALL has none)
    local fields = redis.call('HGETALL', key)
    for j = 1, #fields, 2 do
      local f = field_no[fields[j]]
      if f and f_token[f] == fields[j + 1] then hit(f) end
    end
  else
    local values = redis.call('HMGET', key, unpack(asked))
    for j = 1, #asked do
      if values[j] == f_token[asked_f[j]] then hit(asked_f[j]) end
    end
  end
  if nheld == 0 then break end
  for k = 1, nheld do
    local p = held[k]
    if depth == 0 then order[#order + 1] = p end
    p_blocks[p] = p_blocks[p] + 1
    p_score[p] = p_score[p] + p_best[p]
  end
  depth = depth + 1
  if nheld ~= alive then
    asked, asked_f = {}, {}
    for k = 1, nheld do
      for _, f in ipairs(pod_fields[held[k]]) do
        asked[#asked + 1] = f_name[f]
        asked_f[#asked_f + 1] = f
      end
    end
    alive = nheld
  end
end

local out = {contract[1] or '', contract[2] or '', contract[3] or '0'}
for _, p in ipairs(order) do
  local tiers = {}
  for _, f in ipairs(pod_fields[p]) do
    if f_count[f] > 0 then
      tiers[#tiers + 1] = f_tier[f]
      tiers[#tiers + 1] = f_count[f]
    end
  end
  out[#out + 1] = pods[p]
  out[#out + 1] = p_blocks[p]
  out[#out + 1] = string.format('%.17g', p_score[p])
  out[#out + 1] = #tiers / 2
  for _, x in ipairs(tiers) do out[#out + 1] = x end
end
return out
"""

_SCHEMES = {"valkey": "redis", "valkeys": "rediss"}
_FLAGS = {"": "0", "resync": "1", "restart": "2"}


class StoreError(Exception):
    """A call to the store failed; `kind` (timeout, connection, response, busy, error)
    labels it. Retryable refusals of a write: `out_of_memory` (the server is over maxmemory)
    and `script_missing` (the server forgot the apply script; it is loaded again)."""

    def __init__(self, kind, message, out_of_memory=False, script_missing=False):
        self.kind = kind
        self.out_of_memory = out_of_memory
        self.script_missing = script_missing
        super().__init__(message)


def _store_error(exc):
    if isinstance(exc, (redis_errors.TimeoutError, TimeoutError)):
        return StoreError("timeout", "the index store did not answer in time")
    if isinstance(exc, (redis_errors.ConnectionError, OSError)):
        return StoreError("connection", "cannot reach the index store: %s" % (exc,))
    if isinstance(exc, redis_errors.ResponseError):
        return StoreError("response", "the index store refused a call: %s" % (exc,),
                          out_of_memory=isinstance(exc, redis_errors.OutOfMemoryError),
                          script_missing=isinstance(exc, redis_errors.NoScriptError))
    return StoreError("error", "index store call failed: %s" % (exc,))


def _joined(numbers):
    return ",".join(map(str, numbers))


def client_url(url):
    """The URL as the Redis client takes it: valkey:// and valkeys:// are redis:// and rediss://."""
    scheme, sep, rest = url.partition("://")
    return _SCHEMES.get(scheme.lower(), scheme) + sep + rest


class RedisStore:
    """Index operations against one Redis-protocol server. Every call is bounded by
    `timeout` seconds (connect and each read) and raises StoreError when it fails."""

    def __init__(self, url, *, timeout=1.0, ttl=0, max_connections=64, observe=None):
        self.ttl = int(ttl)
        self.timeout = timeout
        self.url_shown = redact_url(url)
        self._observe = observe      # (operation, seconds) after each successful call
        # Calls in flight are bounded here, not by the pool: a burst waits (at most `timeout`)
        # for a slot and then fails as "busy", which is load, not an outage.
        self._slots = asyncio.Semaphore(max_connections)
        pool = aioredis.ConnectionPool.from_url(
            client_url(url), max_connections=max_connections,
            socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True,
            health_check_interval=0, retry=Retry(NoBackoff(), 0))   # retries are the writer's and watcher's
        self._client = aioredis.Redis(connection_pool=pool)
        self._apply_sha = hashlib.sha1(_APPLY.encode()).hexdigest()
        self._lookup = self._client.register_script(_LOOKUP)
        # The writer's connection, outside the pool: round trips sent, not yet answered
        self._writes = pool.connection_class(**pool.connection_kwargs)
        self._writes_in_flight = collections.deque()    # (batches, time sent)
        self._writes_need_script = True

    async def close(self):
        await self._writes.disconnect()
        await self._client.aclose()

    async def _call(self, operation, coroutine):
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except asyncio.TimeoutError:
            coroutine.close()
            raise StoreError("busy", "every connection to the index store is in use") from None
        start = time.perf_counter()
        try:
            result = await coroutine
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            raise _store_error(exc) from None
        finally:
            self._slots.release()
        if self._observe is not None:
            self._observe(operation, time.perf_counter() - start)
        return result

    async def ping(self):
        return await self._call("ping", self._client.ping())

    async def reconnect(self):
        """Closes the idle connections (pooled, and the writer's unless it waits for answers):
        after an outage they may be to a server that is gone (a restart), and each would
        fail its next call."""
        try:
            await self._client.connection_pool.disconnect(inuse_connections=False)
        except (redis_errors.RedisError, OSError):
            pass    # closing a dead connection may fail; it is closed either way
        if not self._writes_in_flight:
            await self._drop_writes()

    # -- writes ------------------------------------------------------------------------------

    def apply_args(self, stream, seq, ts, flag, pod, ops):
        """The apply script's arguments for one batch of a Journal's ops (lists in them are
        chunks of one comma-separated argument): stream is "<pod>@<model>@<rank>" or ""
        for effects outside any stream (an operator's clear); flag is "resync" (retained
        history re-applied: the position does not move back), "restart" (the first batch
        of a restarted engine, as the ingest saw it: the pod is cleared first, unless the
        store has newer batches already) or ""."""
        return [stream, seq, repr(float(ts)), _FLAGS[flag], self.ttl, pod or ""] + [
            b",".join(x) if type(x) is list else x for x in ops]

    async def apply(self, batches):
        """Applies argument lists made by apply_args, in order, in one pipelined round trip.
        Returns one result per batch: (status, added, removed) with status 0 = already applied
        (skipped), 1 = applied, 2 = applied as the first batch of a restarted engine (its pod
        cleared first); or a StoreError when the server refused that batch (out of memory
        under maxmemory-policy noeviction, say). A StoreError is raised when the round trip
        itself failed: then some batches may have been applied, and sending them again is
        safe (their streams' sequence numbers skip them)."""
        async def run(todo):
            async with self._client.pipeline(transaction=False) as pipe:
                for args in todo:
                    pipe.evalsha(self._apply_sha, 0, *args)
                return await pipe.execute(raise_on_error=False)

        async def run_loading():
            # EVALSHA alone (a registered Script would ask SCRIPT EXISTS on every pipeline);
            # a server that restarted has forgotten the script: load it, send those again
            results = await run(batches)
            again = [i for i, r in enumerate(results) if isinstance(r, redis_errors.NoScriptError)]
            if again:
                await self._client.script_load(_APPLY)
                for i, result in zip(again, await run([batches[i] for i in again])):
                    results[i] = result
            return results
        results = await self._call("apply", run_loading())
        return [_store_error(r) if isinstance(r, Exception) else tuple(int(x) for x in r) for r in results]

    # The writer's path. The server answers one connection's commands in order, so a round
    # trip can be sent before the previous one is answered: kvcm packs the next while the
    # server runs the last, and the server does not sit idle between round trips.

    async def send_applies(self, batches):
        """Sends apply calls (argument lists made by apply_args) in one round trip on the
        writer's connection, without waiting for their answers (receive_applies reads them,
        oldest round trip first). A new connection loads the apply script first (it may reach
        a server that restarted), and so does the first send after a NOSCRIPT answer: the
        caller sends again only once every round trip in flight is answered. StoreError when
        sending failed: then no batch in flight is known applied, and the connection is closed."""
        conn = self._writes
        try:
            if not conn.is_connected:
                # answers still owed on a closed connection (a read cancelled, say) never come
                self._writes_in_flight.clear()
                self._writes_need_script = True
            if self._writes_need_script:
                await conn.connect()
                await conn.send_command("SCRIPT", "LOAD", _APPLY)
                await conn.read_response()
                self._writes_need_script = False
            await conn.send_packed_command(
                conn.pack_commands([("EVALSHA", self._apply_sha, 0, *args) for args in batches]), check_health=False)
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            await self._drop_writes()
            raise _store_error(exc) from None
        self._writes_in_flight.append((len(batches), time.perf_counter()))

    async def receive_applies(self):
        """The answers to the oldest round trip in flight, one per batch, as apply() returns
        them (a NOSCRIPT answer is a StoreError with script_missing). StoreError when reading
        failed, as for send_applies."""
        conn = self._writes
        n, sent = self._writes_in_flight[0]
        results = []
        try:
            for _ in range(n):
                try:
                    results.append(await conn.read_response())
                except redis_errors.ResponseError as exc:
                    results.append(exc)
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            await self._drop_writes()
            raise _store_error(exc) from None
        self._writes_in_flight.popleft()
        if self._observe is not None:
            self._observe("apply", time.perf_counter() - sent)
        if any(isinstance(r, redis_errors.NoScriptError) for r in results):
            self._writes_need_script = True
        return [_store_error(r) if isinstance(r, Exception) else tuple(int(x) for x in r) for r in results]

    async def _drop_writes(self):
        self._writes_in_flight.clear()
        self._writes_need_script = True
        await self._writes.disconnect(nowait=True)

    # -- reads -------------------------------------------------------------------------------

    @staticmethod
    def lookup_args(model, keys, pods, weights, default_weight):
        """The lookup script's arguments. Lists travel as one argument each: the client packs
        arguments one by one, in Python."""
        args = [model, "" if pods is None else "\n" + "\n".join(pods), len(weights)]
        for tier, w in weights.items():
            args += (tier, repr(float(w)))
        return args + [repr(float(default_weight)), _joined(keys)]

    async def lookup(self, model, keys, pods, weights, default_weight):
        """(contract, {pod: (score, blocks, {tier: blocks})}) for the prefix walk of keys;
        contract is (mode, style, lora) as recorded, mode "" when the namespace is unknown."""
        reply = await self._call("lookup", self._lookup(args=self.lookup_args(model, keys, pods, weights, default_weight)))
        out = {}
        i = 3
        while i < len(reply):
            pod, blocks, score, ntiers = reply[i], int(reply[i + 1]), float(reply[i + 2]), int(reply[i + 3])
            i += 4
            tiers = {reply[i + 2 * t]: int(reply[i + 2 * t + 1]) for t in range(ntiers)}
            i += 2 * ntiers
            out[pod] = (score, blocks, tiers)
        return (reply[0], reply[1], reply[2] == "1"), out

    async def _for_members(self, set_key, read):
        """[(member, reply)] for each member of a set: read(pipe, member) queues one command
        per member; two round trips in all."""
        members = sorted(await self._client.smembers(set_key))
        async with self._client.pipeline(transaction=False) as pipe:
            for member in members:
                read(pipe, member)
            return list(zip(members, await pipe.execute()))

    async def namespaces(self):
        """{model: (mode, style, lora, base model or None)} as recorded."""
        states = await self._call("namespaces", self._for_members(
            "kvcm:models", lambda pipe, model: pipe.hmget("kvcm:ns:" + model, "mode", "style", "lora", "base")))
        return {m: (s[0], s[1] or "unknown", s[2] == "1", s[3]) for m, s in states if s[0]}

    async def stream_positions(self):
        """{stream id: seq of the last batch applied}."""
        seqs = await self._call("positions", self._for_members(
            "kvcm:streams", lambda pipe, stream: pipe.hget("kvcm:stream:" + stream, "seq")))
        return {stream: int(seq) for stream, seq in seqs if seq is not None}

    async def holder_counts(self):
        """{pod: {tier: entries}} over every namespace."""
        counts = await self._call("counts", self._for_members(
            "kvcm:models", lambda pipe, model: pipe.hgetall("kvcm:count:" + model)))
        pods = {}
        for _, by_holder in counts:
            for holder, n in by_holder.items():
                pod, _, tier = holder.rpartition("@")
                if int(n) > 0:
                    tiers = pods.setdefault(pod, {})
                    tiers[tier] = tiers.get(tier, 0) + int(n)
        return pods

    async def resolve(self, missing):
        """{namespace: [engine hash]} -> {namespace: [kvcm keys tuple, empty when unknown]},
        in one round trip."""
        names = [(model, h) for model, hashes in missing.items() for h in hashes]
        if not names:
            return {}
        values = await self._call("resolve", self._client.mget(["engine:%s@%d" % name for name in names]))
        out = {model: [] for model in missing}
        for (model, _), value in zip(names, values):
            out[model].append(() if value is None else
                              tuple(int(part.rpartition("@")[2]) for part in value.split(",")))
        return out


__all__ = ["RedisStore", "StoreError", "client_url"]
