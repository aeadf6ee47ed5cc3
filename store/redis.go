package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisBackend is Backend on a Redis server through go-redis.
type redisBackend struct{ c *redis.Client }

// Timeouts short enough that a dead Redis fails a request in seconds, not
// minutes, and one retry: a request whose Redis died mid-way gets a clear
// error (or its local copy), never a hang.
const (
	redisDialTimeout = 2 * time.Second
	redisIOTimeout   = 5 * time.Second
)

// quiet drops go-redis's own log lines (a dial failure is printed once per
// attempt, to stderr): every failure reaches the caller as an error
// wrapping ErrUnavailable, and serve reports it on /health.
type quiet struct{}

func (quiet) Printf(context.Context, string, ...any) {}

var quietOnce sync.Once

func openRedis(raw string) (*redisBackend, error) {
	quietOnce.Do(func() { redis.SetLogger(quiet{}) })
	o, err := redis.ParseURL(raw)
	if err != nil {
		return nil, err
	}
	o.DialTimeout, o.ReadTimeout, o.WriteTimeout = redisDialTimeout, redisIOTimeout, redisIOTimeout
	o.MaxRetries = 1
	return &redisBackend{c: redis.NewClient(o)}, nil
}

// unavailable marks errors reaching Redis (redis.Nil is not one).
func unavailable(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w: redis: %v", ErrUnavailable, err)
}

func (r *redisBackend) Get(ctx context.Context, key string) ([]byte, bool, error) {
	v, err := r.c.Get(ctx, key).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, unavailable(err)
	}
	return v, true, nil
}

func (r *redisBackend) Set(ctx context.Context, key string, v []byte) error {
	return unavailable(r.c.Set(ctx, key, v, 0).Err())
}

func (r *redisBackend) SetNX(ctx context.Context, key string, v []byte) (bool, error) {
	ok, err := r.c.SetNX(ctx, key, v, 0).Result()
	return ok, unavailable(err)
}

// delIfEqual runs in Redis as one step, so that a manifest another process
// wrote after ours was read is not deleted.
var delIfEqual = redis.NewScript(`if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end return 0`)

func (r *redisBackend) DelIfEqual(ctx context.Context, key string, v []byte) error {
	return unavailable(delIfEqual.Run(ctx, r.c, []string{key}, v).Err())
}

func (r *redisBackend) Del(ctx context.Context, keys ...string) error {
	return unavailable(r.c.Del(ctx, keys...).Err())
}

func (r *redisBackend) Ping(ctx context.Context) error { return unavailable(r.c.Ping(ctx).Err()) }

func (r *redisBackend) Close() error { return r.c.Close() }
