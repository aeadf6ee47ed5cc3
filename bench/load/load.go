// Package load drives a kvrecall server with concurrent clients over
// loopback HTTP and reports requests/s, tokens/s and latency percentiles.
package load

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"time"
)

// Config is one load run.
type Config struct {
	URL       string // server base URL
	Clients   int    // concurrent clients
	Requests  int    // total requests
	Prompt    string // completion prompt
	MaxTokens int
	APIKey    string
}

// Result summarises a run.
type Result struct {
	Clients    int     `json:"clients"`
	Requests   int     `json:"requests"`
	Errors     int     `json:"errors"`
	Seconds    float64 `json:"seconds"`
	RPS        float64 `json:"requests_per_second"`
	TokensPerS float64 `json:"generated_tokens_per_second"`
	P50, P99   float64 // milliseconds
	MaxLatency float64
	Status429  int `json:"rejected_429"`
}

// Run sends Requests completions from Clients goroutines; each waits for its
// answer before sending the next (closed loop).
func Run(ctx context.Context, c Config) (Result, error) {
	body, err := json.Marshal(map[string]any{"prompt": c.Prompt, "max_tokens": c.MaxTokens, "temperature": 0})
	if err != nil {
		return Result{}, err
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: c.Clients}}
	var mu sync.Mutex
	var lat []float64
	res := Result{Clients: c.Clients, Requests: c.Requests}
	tokens := 0
	next := make(chan struct{}, c.Requests)
	for i := 0; i < c.Requests; i++ {
		next <- struct{}{}
	}
	close(next)
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < c.Clients; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				if ctx.Err() != nil {
					return
				}
				t0 := time.Now()
				req, _ := http.NewRequestWithContext(ctx, "POST", c.URL+"/v1/completions", bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				if c.APIKey != "" {
					req.Header.Set("Authorization", "Bearer "+c.APIKey)
				}
				resp, err := client.Do(req)
				var out struct {
					Usage struct {
						CompletionTokens int `json:"completion_tokens"`
					} `json:"usage"`
				}
				ok := err == nil && resp.StatusCode == http.StatusOK
				if err == nil {
					if ok {
						json.NewDecoder(resp.Body).Decode(&out)
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				ms := float64(time.Since(t0).Microseconds()) / 1000
				mu.Lock()
				if ok {
					lat = append(lat, ms)
					tokens += out.Usage.CompletionTokens
				} else {
					res.Errors++
					if err == nil && resp.StatusCode == http.StatusTooManyRequests {
						res.Status429++
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	if len(lat) == 0 {
		return res, fmt.Errorf("no request succeeded (%d errors)", res.Errors)
	}
	slices.Sort(lat)
	res.RPS = float64(len(lat)) / res.Seconds
	res.TokensPerS = float64(tokens) / res.Seconds
	res.P50 = lat[len(lat)/2]
	res.P99 = lat[min(len(lat)-1, (len(lat)*99+99)/100-1)]
	res.MaxLatency = lat[len(lat)-1]
	return res, nil
}

// Table formats results as Markdown, with latency relative to one client.
func Table(rs []Result) string {
	s := "| clients | requests | errors | requests/s | generated tok/s | p50 ms | p99 ms | p50 vs 1 client |\n|---|---|---|---|---|---|---|---|\n"
	for _, r := range rs {
		s += fmt.Sprintf("| %d | %d | %d | %.2f | %.1f | %.1f | %.1f | %.2fx |\n", r.Clients, r.Requests, r.Errors, r.RPS, r.TokensPerS, r.P50, r.P99, r.P50/rs[0].P50)
	}
	return s
}
