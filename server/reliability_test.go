package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Every sampling field out of range is a 400 that names the field, on both
// APIs, streamed or not; nothing reaches the sampler (repeat_penalty 1e-38
// used to be a 500 "logits sum to NaN").
func TestValidation(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	type obj = map[string]any
	openai := []struct {
		field string
		value any
	}{
		{"temperature", 7}, {"temperature", -1}, {"top_p", 1.5}, {"top_p", -0.1}, {"top_k", -1},
		{"min_p", 2}, {"min_p", -0.5}, {"repeat_penalty", 1e-38}, {"repeat_penalty", -1}, {"repeat_penalty", 1000},
		{"seed", -5}, {"max_tokens", 0}, {"max_completion_tokens", -1}, {"n", 2}, {"stop", []string{""}},
		{"stop", strings.Split(strings.Repeat("x,", 17), ",")}, {"budget", -1}, {"policy", "magic"},
	}
	for _, c := range openai {
		for _, stream := range []bool{false, true} {
			for _, route := range []string{"/v1/completions", "/v1/chat/completions"} {
				t.Run(fmt.Sprintf("%s %s=%v stream=%v", route, c.field, c.value, stream), func(t *testing.T) {
					body := obj{"prompt": "pako", "messages": []obj{{"role": "user", "content": "pako"}}, "stream": stream, c.field: c.value}
					if route == "/v1/completions" {
						delete(body, "messages")
					} else {
						delete(body, "prompt")
					}
					resp := fx.do("POST", route, "", body)
					require.Equal(t, http.StatusBadRequest, resp.StatusCode)
					e := decode[map[string]map[string]any](t, resp)
					require.Contains(t, e["error"]["message"], c.field)
					require.Equal(t, "invalid_request_error", e["error"]["type"])
				})
			}
		}
	}
	ollama := []struct {
		field string
		value any
	}{
		{"temperature", 9}, {"top_p", 2}, {"top_k", -1}, {"min_p", -1}, {"repeat_penalty", 1e-38},
		{"seed", -2}, {"repeat_last_n", -5}, {"num_predict", -3}, {"num_ctx", -1}, {"stop", []string{""}},
	}
	for _, c := range ollama {
		for _, route := range []string{"/api/generate", "/api/chat"} {
			t.Run(fmt.Sprintf("%s options.%s=%v", route, c.field, c.value), func(t *testing.T) {
				body := obj{"prompt": "pako", "messages": []obj{{"role": "user", "content": "pako"}}, "options": obj{c.field: c.value}}
				resp := fx.do("POST", route, "", body)
				require.Equal(t, http.StatusBadRequest, resp.StatusCode)
				require.Contains(t, decode[map[string]string](t, resp)["error"], "options."+c.field)
			})
		}
	}
	t.Run("empty prompt", func(t *testing.T) {
		resp := fx.do("POST", "/v1/completions", "", obj{"prompt": ""})
		require.Equal(t, http.StatusBadRequest, resp.StatusCode)
		require.Contains(t, decode[map[string]map[string]any](t, resp)["error"]["message"], "prompt is empty")
	})
	t.Run("in range still generates", func(t *testing.T) {
		resp := fx.do("POST", "/v1/completions", "", obj{"prompt": "pako", "max_tokens": 2, "repeat_penalty": 1.1, "top_k": 0, "min_p": 0.05, "top_p": 1, "seed": 0})
		require.Equal(t, http.StatusOK, resp.StatusCode)
		resp.Body.Close()
	})
}

// A streamed request that the server must refuse gets the real status and a
// JSON error, not a 200 and an event stream.
func TestStreamErrorsBeforeFirstByte(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	resp := fx.do("POST", "/v1/documents?id=d", "text/plain", fx.text)
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	resp.Body.Close()
	long := strings.Repeat("pako ", 5000)
	msgs := func(s string) []map[string]string { return []map[string]string{{"role": "user", "content": s}} }
	cases := []struct {
		name, path string
		body       map[string]any
		status     int
		want       string
	}{
		{"unknown document", "/v1/chat/completions", map[string]any{"document": "nope", "messages": msgs("x")}, 404, "no such document"},
		{"context overflow", "/v1/chat/completions", map[string]any{"messages": msgs(long)}, 400, "nothing was truncated"},
		{"context overflow after a document", "/v1/completions", map[string]any{"document": "d", "prompt": long}, 400, "nothing was truncated"},
		{"bad budget", "/v1/chat/completions", map[string]any{"document": "d", "budget": -3, "messages": msgs("x")}, 400, "budget"},
		{"bad policy", "/v1/completions", map[string]any{"document": "d", "policy": "magic", "prompt": "x"}, 400, "policy"},
		{"unknown document (ollama)", "/api/chat", map[string]any{"document": "nope", "messages": msgs("x")}, 404, "no such document"},
		{"context overflow (ollama)", "/api/generate", map[string]any{"prompt": long}, 400, "nothing was truncated"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.body["stream"] = true
			resp := fx.do("POST", c.path, "", c.body)
			require.Equal(t, c.status, resp.StatusCode)
			require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			require.Contains(t, string(b), c.want)
			require.NotContains(t, string(b), "server_error")
		})
	}
}

// An over-long prompt is refused before it takes a slot (the only slot is
// held here, and there is no queue), and without tokenizing all of it.
func TestOverlongPromptRefusedBeforeAdmission(t *testing.T) {
	fx := newFixture(t, Config{QueueLength: -1}, "")
	release, err := fx.s.acquire(context.Background())
	require.NoError(t, err)
	defer release()
	start := time.Now()
	resp := fx.do("POST", "/v1/completions", "", map[string]any{"prompt": strings.Repeat("pako tafo ", 1<<20)}) // 10 MiB
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, "not 429: the prompt is checked first")
	require.Contains(t, decode[map[string]map[string]any](t, resp)["error"]["message"], "nothing was truncated")
	require.Less(t, time.Since(start), 5*time.Second)
	// So is a document that cannot fit whatever its tokens.
	resp = fx.do("POST", "/v1/documents?id=big", "text/plain", strings.Repeat("pako tafo ", 1<<20))
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.Contains(t, decode[map[string]map[string]any](t, resp)["error"]["message"], "context length")
	// A prompt that fits waits for the slot: with no queue it is refused.
	resp = fx.do("POST", "/v1/completions", "", with(greedy(2), "prompt", "pako"))
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode, "QueueLength < 0 means no queue")
	resp.Body.Close()
	require.Equal(t, 1.0, outcomes(t, fx, "completions")["busy"], "429s have their own outcome")
}

// outcomes reads kvrecall_requests_total of a route by outcome.
func outcomes(t *testing.T, fx *fixture, route string) map[string]float64 {
	resp := fx.do("GET", "/metrics", "", nil)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		var outcome string
		var v float64
		prefix := `kvrecall_requests_total{outcome="`
		if !strings.HasPrefix(line, prefix) || !strings.Contains(line, `route="`+route+`"`) {
			continue
		}
		outcome, _, _ = strings.Cut(strings.TrimPrefix(line, prefix), `"`)
		_, rest, _ := strings.Cut(line, "} ")
		fmt.Sscan(rest, &v)
		out[outcome] = v
	}
	return out
}

func TestMethodNotAllowed(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	cases := []struct {
		method, path, allow string
	}{
		{"GET", "/v1/completions", "POST"},
		{"DELETE", "/v1/models", "GET, HEAD"},
		{"PUT", "/v1/documents/x", "GET, HEAD, DELETE"},
		{"GET", "/api/chat", "POST"},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			resp := fx.do(c.method, c.path, "", nil)
			require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
			require.Equal(t, c.allow, resp.Header.Get("Allow"))
			resp.Body.Close()
		})
	}
	resp := fx.do("GET", "/v2/nothing", "", nil)
	require.Equal(t, http.StatusNotFound, resp.StatusCode, "an unknown path stays 404")
	resp.Body.Close()
}

// Errors and /api/show do not tell clients where the server keeps files.
func TestNoPathsInAnswers(t *testing.T) {
	fx := newFixture(t, Config{}, "")
	// A document whose metadata cannot be read: the error names the file.
	require.NoError(t, os.MkdirAll(filepath.Join(fx.dir, "bad", "doc.json"), 0o700))
	resp := fx.do("POST", "/v1/completions", "", with(greedy(2), "prompt", "x", "document", "bad"))
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusInternalServerError, resp.StatusCode, "%s", b)
	require.Contains(t, string(b), "doc.json")
	require.NotContains(t, string(b), fx.dir)
	show := decode[map[string]any](t, fx.do("POST", "/api/show", "", map[string]string{"model": "recall"}))
	require.NotContains(t, show["modelfile"], filepath.Dir(fx.m.Path()))
	require.Contains(t, show["modelfile"], "FROM "+filepath.Base(fx.m.Path()))
}

// serveReal runs s behind a real http.Server from HTTPServer (timeouts and
// all) on a loopback port; base is its requests' parent context.
func serveReal(t *testing.T, s *Server, base context.Context) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ln := smallSendBuffer{l.(*net.TCPListener)}
	hs := s.HTTPServer(ln.Addr().String(), base)
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	return ln.Addr().String()
}

// smallSendBuffer gives accepted connections a small, fixed send buffer
// (Linux otherwise grows it to megabytes, which a test would have to fill
// before a write blocks).
type smallSendBuffer struct{ *net.TCPListener }

func (l smallSendBuffer) Accept() (net.Conn, error) {
	c, err := l.AcceptTCP()
	if err == nil {
		c.SetWriteBuffer(4096)
	}
	return c, err
}

func TestTimeouts(t *testing.T) {
	fx := newFixture(t, Config{ReadTimeout: 500 * time.Millisecond, IdleTimeout: 500 * time.Millisecond, WriteTimeout: 300 * time.Millisecond, MaxTokens: 100000}, "")
	addr := serveReal(t, fx.s, context.Background())

	t.Run("a trickled body is cut by the read timeout", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		start := time.Now()
		fmt.Fprintf(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
		go func() { // one byte every 100 ms, far slower than needed
			for i := 0; i < 50; i++ {
				time.Sleep(100 * time.Millisecond)
				if _, err := c.Write([]byte(" ")); err != nil {
					return
				}
			}
		}()
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusRequestTimeout, resp.StatusCode)
		require.Less(t, time.Since(start), 3*time.Second)
	})

	t.Run("an idle keep-alive connection is closed", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		fmt.Fprintf(c, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
		rd := bufio.NewReader(c)
		resp, err := http.ReadResponse(rd, nil)
		require.NoError(t, err)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		start := time.Now()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = rd.ReadByte()
		require.ErrorIs(t, err, io.EOF, "the server closed the idle connection")
		require.Less(t, time.Since(start), 3*time.Second)
	})

	t.Run("a request outlives the read timeout", func(t *testing.T) {
		// The request waits in the queue past the read timeout, then runs:
		// the read deadline must be lifted once the body is in, or net/http
		// cancels the request's context when it passes.
		release, err := fx.s.acquire(context.Background())
		require.NoError(t, err)
		go func() {
			require.Eventually(t, func() bool { return fx.s.queued.Load() == 1 }, 5*time.Second, 5*time.Millisecond)
			time.Sleep(800 * time.Millisecond)
			release()
		}()
		body, _ := json.Marshal(map[string]any{"prompt": fx.text, "max_tokens": 20, "temperature": 0, "stream": true})
		start := time.Now()
		resp, err := http.Post("http://"+addr+"/v1/completions", "application/json", bytes.NewReader(body))
		require.NoError(t, err)
		lines := sseLines(t, resp)
		require.Greater(t, time.Since(start), 800*time.Millisecond)
		require.Greater(t, len(lines), 10)
	})

	t.Run("a client that stops reading frees the slot", func(t *testing.T) {
		before := counter(t, fx, "kvrecall_tokens_predicted_total")
		d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			// A tiny receive window: the server's writes block soon.
			return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1024) })
		}}
		c, err := d.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		body, _ := json.Marshal(map[string]any{"prompt": "pako", "max_tokens": 4000, "stream": true, "seed": 1})
		fmt.Fprintf(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		// Never read. The generation must stop once a write has blocked
		// for the write timeout.
		require.Eventually(t, func() bool { return outcomes(t, fx, "completions")["write_timeout"] == 1 }, 30*time.Second, 50*time.Millisecond,
			"outcomes %v", outcomes(t, fx, "completions"))
		require.Eventually(t, func() bool { return len(fx.s.slots) == 0 }, 5*time.Second, 10*time.Millisecond)
		require.Less(t, counter(t, fx, "kvrecall_tokens_predicted_total")-before, 4000.0, "stopped early")
	})
}

// Streams that the server cancels (shutdown) end with an error the client
// sees: an SSE error event and no [DONE]; an NDJSON error line and no done.
func TestShutdownCancelsStreamsVisibly(t *testing.T) {
	cases := []struct {
		name, path string
		body       map[string]any
		check      func(t *testing.T, last string, all []string)
	}{
		{"openai", "/v1/completions", map[string]any{"prompt": "pako", "max_tokens": 3000, "stream": true}, func(t *testing.T, last string, all []string) {
			require.True(t, strings.HasPrefix(last, "data: "), last)
			var e map[string]map[string]any
			require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(last, "data: ")), &e), last)
			require.Contains(t, e["error"]["message"], "shutting down")
			require.Equal(t, "503", e["error"]["code"])
			for _, l := range all {
				require.NotContains(t, l, "[DONE]", "a cut stream must not look complete")
			}
		}},
		{"ollama", "/api/generate", map[string]any{"prompt": "pako", "options": map[string]any{"num_predict": 3000}}, func(t *testing.T, last string, all []string) {
			var e map[string]any
			require.NoError(t, json.Unmarshal([]byte(last), &e), last)
			require.Contains(t, e["error"], "shutting down")
			for _, l := range all {
				require.NotContains(t, l, `"done":true`)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fx := newFixture(t, Config{MaxTokens: 100000}, "")
			base, cancel := context.WithCancelCause(context.Background())
			defer cancel(nil)
			addr := serveReal(t, fx.s, base)
			b, _ := json.Marshal(c.body)
			resp, err := http.Post("http://"+addr+c.path, "application/json", bytes.NewReader(b))
			require.NoError(t, err)
			defer resp.Body.Close()
			sc := bufio.NewScanner(resp.Body)
			var lines []string
			for len(lines) < 3 && sc.Scan() {
				if sc.Text() != "" {
					lines = append(lines, sc.Text())
				}
			}
			cancel(ErrShutdown)
			for sc.Scan() {
				if sc.Text() != "" {
					lines = append(lines, sc.Text())
				}
			}
			require.True(t, sc.Err() == nil || errors.Is(sc.Err(), io.ErrUnexpectedEOF), "%v", sc.Err())
			c.check(t, lines[len(lines)-1], lines)
			require.Eventually(t, func() bool {
				return outcomes(t, fx, strings.TrimPrefix(strings.TrimPrefix(c.path, "/v1/"), "/api/"))["shutdown"] == 1
			},
				5*time.Second, 10*time.Millisecond)
		})
	}
}
