"""
The C{ratelimit} hook: a GCRA rate limit per client, header value, JWT
subject or service, kept in this process or shared by every replica through
Redis.

    hooks:
      - name: ratelimit
        options:
          rate: 600/m              # required: COUNT/s, COUNT/m or COUNT/h
          burst: 20                # default: the rate's COUNT
          key: client              # client | header:<Name> | jwt-subject | service
          scope: service           # service | global
          redis: redis://redis.monedge:6379/0   # default: in this process
          on-redis-error: open     # open | closed | local
          redis-timeout: 250ms
          max-keys: 100000         # in-memory buckets kept at most
          name: default            # the policy's name in the RateLimit fields

Options:

  - C{rate} (string, required): the sustained rate, C{COUNT/UNIT} with a
    whole COUNT of 1 or more and a UNIT of C{s}, C{m} or C{h}.  One request
    is earned back every UNIT/COUNT (the emission interval).
  - C{burst} (whole number, default: the rate's COUNT): the most requests
    that may pass at once, from a bucket that has been idle long enough to
    be full.  C{rate: 600/m, burst: 10} lets 10 through at once, then one
    every 100 ms.
  - C{key} (string, default C{client}): what a bucket is keyed by.
      - C{client}: the client's address as monedge resolved it with
        C{--trusted-hops}, i.e. the first address of the X-Forwarded-For
        monedge sends upstream (with no trusted hops, the TCP peer).  The
        TCP peer itself is used if that header is absent.
      - C{header:<Name>}: the first value of the request header C{Name}, as
        it will be sent upstream (so a header an earlier hook set, such as
        an authenticated user id, counts and a client's copy it removed
        does not).  Requests without the header are keyed by the client
        address, never all together: anonymous clients cannot exhaust one
        shared bucket.  A client can choose a header's value: key on a
        header only if something before monedge, or an earlier hook, sets
        it.
      - C{jwt-subject}: the C{sub} claim of the C{Authorization: Bearer}
        JWT the client sent, read WITHOUT verifying the token.  Anyone can
        mint a token with any subject, so this is only trustworthy when an
        authentication hook that verifies the token runs first (a global
        hook, or earlier in the service's list).  Requests without a
        readable Bearer JWT with a string C{sub} are keyed by the client
        address.
      - C{service}: one bucket for the whole service.
  - C{scope} (string, default C{service}): C{service} keeps separate
    buckets per service (a global hook then limits each client on each
    service); C{global} shares them across every service that runs this
    hook configuration (a global hook then limits each client proxy-wide).
    Hooks with equal options are built once and shared, so without the
    service in the key two services configured alike would share buckets.
  - C{redis} (string, default none): C{redis://[[user]:password@]host
    [:port][/db]} (port 6379, db 0 by default).  Without it, buckets are
    kept in this process: each replica then limits on its own.  With it,
    every replica shares each bucket through one atomic Lua script (one
    EVALSHA round trip per request, pipelined with concurrent requests'
    over a pool of REDIS_POOL_SIZE connections, by L{monedge.builtin.ratelimit.redisclient}),
    timed by the Redis server's clock so that replicas with skewed clocks
    agree.  Keys are
    C{monedge:rl:<COUNT/UNIT>:<burst>:<scope>:<key>} and expire as soon as
    their bucket is full again, so Redis holds only active buckets.  Hook
    options are shown on the admin C{/routes} page: prefer a Redis without
    a password, reachable only from monedge.
  - C{on-redis-error} (string, default C{open}): how a request Redis did
    not decide is decided (no reply within C{redis-timeout}, an error
    reply, a lost or refused connection, or an outage under way).
    C{open} lets it through (without RateLimit fields); C{closed} answers
    500 C{hook_failed}; C{local} decides it with in-memory buckets in this
    process, with the same limit, carried on from what Redis last said
    about each bucket this process saw (each replica then limits on its
    own).  A failure alone fails only its request, and PINGs Redis.  An
    outage starts when that PING fails or after OUTAGE_AFTER (3) requests
    in a row failed; during it Redis is not asked (requests are decided at
    once) but PINGed every PROBE_INTERVAL (1 s), and the first PONG ends
    it.  One warning is logged as an outage starts and one info line as it
    ends (with how many requests were decided without Redis), and nothing
    else: no traceback, no line per request.
  - C{redis-timeout} (duration, default C{250ms}): how long a command may
    wait for its reply, from its write to Redis (written at once, not on
    the reactor's next turn).  A deadline is judged only after monedge has
    read what Redis sent, so time monedge spent on other work is never
    taken for a slow Redis.  A request that finds no open connection is
    timed from when it asked: waiting for a connection counts.  Must be
    below the hook timeout.
  - C{max-keys} (whole number, default 100000): the most in-memory buckets
    kept.  Buckets that have filled up again are dropped as requests come;
    beyond the cap the least recently used bucket is dropped (its client
    starts afresh), so memory stays bounded under any number of keys.
  - C{name} (string, default C{default}): the policy name in the RateLimit
    fields (letters, digits, C{.}, C{_}, C{-}).

Over the limit, the hook answers 429 C{rate_limited} with the fields of
draft-ietf-httpapi-ratelimit-headers (draft 11, structured form) and
C{Retry-After}:

    Retry-After: 6
    RateLimit-Policy: "default";q=10;w=60
    RateLimit: "default";r=0;t=6

C{q} and C{w} are the configured rate (COUNT per UNIT in seconds);
C{;monedge-burst=N} is added when the burst differs from COUNT.  C{r} is
how many more requests would pass right now; C{t} is how many seconds
(rounded up, at least 1) until one more is earned: the client can use no
more than C{r} within C{t}.  On a 429 C{t} equals C{Retry-After}.  Allowed
requests get the same C{RateLimit-Policy} and C{RateLimit} fields on their
response.

The package, one idea a module: C{algorithm} (GCRA, L{Limit} and
C{Decision}), C{memory} (the buckets in this process), C{redisstore} (the
buckets in Redis, their Lua script and outages), C{hook} (keys, 429s and
RateLimit fields), C{metrics} (the Prometheus collector) and C{factory}
(these options and the factory).  This module re-exports the names other
code imports.
"""

from monedge.builtin.ratelimit.algorithm import Limit, gcra
from monedge.builtin.ratelimit.factory import RateLimitHookFactory
from monedge.builtin.ratelimit.hook import RateLimitHook
from monedge.builtin.ratelimit.redisstore import (
    KEY_PREFIX,
    OUTAGE_AFTER,
    REDIS_POOL_SIZE,
    SCRIPT_SHA,
    RedisLimiter,
)

__all__ = [
    "KEY_PREFIX",
    "OUTAGE_AFTER",
    "REDIS_POOL_SIZE",
    "SCRIPT_SHA",
    "Limit",
    "RateLimitHook",
    "RateLimitHookFactory",
    "RedisLimiter",
    "gcra",
]
