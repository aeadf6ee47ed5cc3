package serve

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/server"
)

// The test binary doubles as the server: the tests below start it as a
// separate process, as a user would, and signal it.
func TestMain(m *testing.M) {
	if os.Getenv("KVRECALL_SERVE_MAIN") == "1" {
		if err := Run(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "serve:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func freePort(t testing.TB) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

type proc struct {
	cmd  *exec.Cmd
	url  string
	logs *bytes.Buffer
}

func start(t testing.TB, model, data string, extra ...string) *proc {
	t.Helper()
	port := freePort(t)
	args := append([]string{"--model", model, "--data", data, "--ctx", "4096", "--threads", "2", "--shutdown-grace", "60s"}, extra...)
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "KVRECALL_SERVE_MAIN=1", fmt.Sprintf("KVRECALL_PORT=%d", port))
	logs := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	require.NoError(t, cmd.Start())
	p := &proc{cmd: cmd, url: fmt.Sprintf("http://127.0.0.1:%d", port), logs: logs}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(p.url + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
			require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "health answers 503 while loading")
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not become healthy: %s", logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func post(t testing.TB, url, ctype, body string) (int, string) {
	resp, err := http.Post(url, ctype, strings.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// Ingest, stop, start, ask: the document survives and is not prefilled again.
// SIGTERM lets an in-flight request finish and exits cleanly.
func TestServeRestartAndShutdown(t *testing.T) {
	model := testmodels.Recall(t)
	f, err := gguf.Open(model)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(2000, []float64{0.6}, 3)
	require.NoError(t, err)
	words := func(ids []int32) string {
		var parts []string
		for _, id := range ids {
			parts = append(parts, strings.TrimPrefix(f.KVs[indexOf(f, "tokenizer.ggml.tokens")].Value.([]string)[id], "▁"))
		}
		return strings.Join(parts, " ")
	}
	text := words(c.Tokens[1:])
	n := c.Needles[0]
	question, answer := words(voc.Question(n)), words(n.Values)
	data := t.TempDir()

	p := start(t, model, data)
	status, body := post(t, p.url+"/v1/documents?id=kept", "text/plain", text)
	require.Equal(t, http.StatusCreated, status, body)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, p.cmd.Wait(), "clean exit: %s", p.logs)

	p = start(t, model, data)
	req := fmt.Sprintf(`{"document":"kept","prompt":%q,"max_tokens":3,"temperature":0}`, question)
	status, body = post(t, p.url+"/v1/completions", "application/json", req)
	require.Equal(t, http.StatusOK, status, body)
	var out struct {
		Choices []struct{ Text string } `json:"choices"`
		Timings map[string]float64      `json:"timings"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &out))
	require.Equal(t, " "+answer, out.Choices[0].Text)
	require.EqualValues(t, 4, out.Timings["prompt_n"], "only the question was evaluated after the restart")

	// A long streamed generation is in flight when SIGTERM arrives: it
	// finishes (within the grace period) and the process exits cleanly.
	stream := fmt.Sprintf(`{"prompt":%q,"max_tokens":60,"temperature":0,"stream":true}`, text[:2000])
	resp, err := http.Post(p.url+"/v1/completions", "application/json", strings.NewReader(stream))
	require.NoError(t, err)
	rd := bufio.NewReader(resp.Body)
	_, err = rd.ReadString('\n')
	require.NoError(t, err)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	rest, err := io.ReadAll(rd)
	require.NoError(t, err)
	require.True(t, strings.HasSuffix(strings.TrimSpace(string(rest)), "data: [DONE]"), "the in-flight stream completes")
	require.NoError(t, p.cmd.Wait(), "clean exit: %s", p.logs)
	_, err = http.Get(p.url + "/health")
	require.Error(t, err, "the server is gone")
}

func indexOf(f *gguf.File, key string) int {
	for i, kv := range f.KVs {
		if kv.Key == key {
			return i
		}
	}
	return -1
}

func TestFlagsFromEnvironment(t *testing.T) {
	t.Setenv("KVRECALL_KV_BUDGET", "1024")
	t.Setenv("KVRECALL_HOST", "0.0.0.0")
	s, err := parse([]string{"--port", "9999"})
	require.NoError(t, err)
	require.Equal(t, 1024, s.budget)
	require.Equal(t, "0.0.0.0", s.host)
	require.Equal(t, 9999, s.port)
	s, err = parse([]string{"--kv-budget", "512"})
	require.NoError(t, err)
	require.Equal(t, 512, s.budget, "a flag wins over the environment")
	t.Setenv("KVRECALL_PORT", "nope")
	_, err = parse(nil)
	require.ErrorContains(t, err, "KVRECALL_PORT")
}

func TestTimeoutAndQueueFlags(t *testing.T) {
	s, err := parse(nil)
	require.NoError(t, err)
	require.Equal(t, server.DefaultReadTimeout, s.readTimeout)
	require.Equal(t, server.DefaultIdleTimeout, s.idleTimeout)
	require.Equal(t, server.DefaultWriteTimeout, s.writeTimeout)
	require.Equal(t, server.DefaultQueueLength, s.queue)
	t.Setenv("KVRECALL_WRITE_TIMEOUT", "5s")
	t.Setenv("KVRECALL_IDLE_TIMEOUT", "0")
	s, err = parse([]string{"--read-timeout", "2s", "--queue", "0"})
	require.NoError(t, err)
	require.Equal(t, 5*time.Second, s.writeTimeout)
	require.Equal(t, 2*time.Second, s.readTimeout)
	require.Equal(t, time.Duration(-1), orNone(s.idleTimeout), "0 means no timeout")
	require.Equal(t, -1, orNone(s.queue), "--queue 0 means no queue, not the default")
	for _, bad := range [][]string{{"--queue", "-1"}, {"--write-timeout", "-1s"}, {"--read-timeout", "soon"}} {
		_, err := parse(bad)
		require.Error(t, err, "%v", bad)
	}
}

// SIGTERM whose grace period runs out while a generation is in flight, in
// prefill or in decode: the generation is cancelled at its next batch or
// token, its client gets an error event (not a stream that looks
// complete), and the process exits 0. Closing the model under the running
// forward pass used to be a SIGSEGV (exit 139): the prefill case signals
// a second into the prefill of a 15k-token prompt (over 3 s here), when
// each batch attends to thousands of keys and takes long enough to be
// caught in flight.
func TestShutdownGraceExpires(t *testing.T) {
	model := testmodels.Recall(t)
	f, err := gguf.Open(model)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(15000, []float64{0.5}, 5)
	require.NoError(t, err)
	vocab := f.KVs[indexOf(f, "tokenizer.ggml.tokens")].Value.([]string)
	var parts []string
	for _, id := range c.Tokens[1:] {
		parts = append(parts, strings.TrimPrefix(vocab[id], "▁"))
	}
	long := strings.Join(parts, " ")
	cases := []struct {
		name, path, body string
		// chunks to read before the signal: the chat role chunk comes just
		// before prefill starts; five token chunks mean decode is running.
		before int
		wait   time.Duration // then, before the signal
	}{
		{"during prefill", "/v1/chat/completions", fmt.Sprintf(`{"messages":[{"role":"user","content":%q}],"max_tokens":5,"stream":true}`, long), 1, time.Second},
		{"during decode", "/v1/completions", `{"prompt":"pako","max_tokens":3000,"stream":true}`, 6, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := start(t, model, t.TempDir(), "--shutdown-grace", "1ms", "--max-tokens", "3000", "--ctx", "16384")
			resp, err := http.Post(p.url+tc.path, "application/json", strings.NewReader(tc.body))
			require.NoError(t, err)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			sc := bufio.NewScanner(resp.Body)
			var events []string
			for len(events) < tc.before && sc.Scan() {
				if sc.Text() != "" {
					events = append(events, sc.Text())
				}
			}
			require.Len(t, events, tc.before)
			time.Sleep(tc.wait)
			t0 := time.Now()
			require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
			for sc.Scan() {
				if sc.Text() != "" {
					events = append(events, sc.Text())
				}
			}
			resp.Body.Close()
			require.NoError(t, p.cmd.Wait(), "exit 0: %s", p.logs)
			require.Less(t, time.Since(t0), 10*time.Second, "cancelled at the next batch or token")
			last := events[len(events)-1]
			require.Contains(t, last, `"error"`, "the cut stream ends with an error event: %v", events[max(0, len(events)-3):])
			require.Contains(t, last, "shutting down")
			for _, e := range events {
				require.NotContains(t, e, "[DONE]")
				require.NotContains(t, e, `"finish_reason":"`, "the generation did not finish")
			}
			if tc.before == 1 {
				require.Len(t, events, 2, "cancelled in prefill: no token came before the error")
			}
		})
	}
}

// --squeezed reaches the model: documents are clustered at ingest (it was
// parsed and then dropped).
func TestSqueezedFlagReachesModel(t *testing.T) {
	for _, tc := range []struct {
		args []string
		on   bool
	}{{nil, false}, {[]string{"--squeezed"}, true}} {
		t.Run(fmt.Sprint(tc.on), func(t *testing.T) {
			st, err := parse(tc.args)
			require.NoError(t, err)
			require.Equal(t, tc.on, st.modelOptions().Squeezed != nil)
		})
	}
}
