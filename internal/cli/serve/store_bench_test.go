package serve

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/internal/redistest"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

// BenchmarkSharedStoreFirstAnswer: the time to the first answer on a
// document of KVRECALL_BENCH_TOKENS tokens (default 32768) on an instance
// that ingests it (prefill + question) against a second instance that
// fetches it from Redis (fetch + question), in the same run; the bytes the
// second instance read and the Redis memory the document takes, per 1k
// tokens. docs/performance.md has the command and the numbers.
//
//	go test ./internal/cli/serve -run '^$' -bench SharedStoreFirstAnswer -benchtime 1x
func BenchmarkSharedStoreFirstAnswer(b *testing.B) {
	tokens := 32768
	if v, err := strconv.Atoi(os.Getenv("KVRECALL_BENCH_TOKENS")); err == nil {
		tokens = v
	}
	model := testmodels.Recall(b)
	r := redistest.Start(b)
	rc := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer rc.Close()
	ctx := context.Background()
	usedMemory := func() float64 {
		info, err := rc.Info(ctx, "memory").Result()
		require.NoError(b, err)
		for _, l := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(l, "used_memory:"); ok {
				f, err := strconv.ParseFloat(v, 64)
				require.NoError(b, err)
				return f
			}
		}
		b.Fatal("no used_memory in INFO")
		return 0
	}
	text, question, answer := needleCase(b, model, tokens, 5)
	ctxLen := strconv.Itoa(tokens + 1024)
	for i := 0; i < b.N; i++ {
		require.NoError(b, rc.FlushAll(ctx).Err())
		before := usedMemory()
		a := start(b, model, b.TempDir(), "--store", r.URL, "--ctx", ctxLen)
		c := start(b, model, b.TempDir(), "--store", r.URL, "--ctx", ctxLen)

		t0 := time.Now()
		ingestDoc(b, a, "bench", text)
		status, out := ask(b, a, "bench", question)
		fresh := time.Since(t0)
		require.Equal(b, http.StatusOK, status, out.Error.Message)
		require.Equal(b, " "+answer, out.Choices[0].Text)
		mem := usedMemory() - before

		t0 = time.Now()
		status, out = ask(b, c, "bench", question)
		shared := time.Since(t0)
		require.Equal(b, http.StatusOK, status, out.Error.Message)
		require.Equal(b, " "+answer, out.Choices[0].Text)
		require.Less(b, out.Timings["prompt_n"], float64(tokens)/10, "the second instance did not prefill")

		resp, err := http.Get(c.url + "/health")
		require.NoError(b, err)
		var h struct {
			Store struct {
				Stats struct {
					BytesRead float64 `json:"bytes_read"`
				} `json:"stats"`
			} `json:"store"`
		}
		require.NoError(b, json.NewDecoder(resp.Body).Decode(&h))
		resp.Body.Close()
		k := float64(tokens) / 1000
		b.ReportMetric(fresh.Seconds(), "ingest+answer_s")
		b.ReportMetric(shared.Seconds(), "fetch+answer_s")
		b.ReportMetric(fresh.Seconds()/shared.Seconds(), "speedup")
		b.ReportMetric(h.Store.Stats.BytesRead/k, "bytes_read/1k_tokens")
		b.ReportMetric(mem/k, "redis_bytes/1k_tokens")
		a.cmd.Process.Kill()
		c.cmd.Process.Kill()
	}
}
