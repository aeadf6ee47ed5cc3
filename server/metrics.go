package server

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kvrecall/kvrecall/runtime"
)

// metrics are exported at /metrics in Prometheus text format. Names follow
// llama-server's where they overlap (prompt tokens, predicted tokens,
// requests processing/deferred).
type metrics struct {
	reg          *prometheus.Registry
	promptTokens prometheus.Counter
	genTokens    prometheus.Counter
	cachedTokens prometheus.Counter
	requests     *prometheus.CounterVec
	inFlight     prometheus.Gauge
	queued       prometheus.Gauge
	prefillTPS   prometheus.Gauge
	decodeTPS    prometheus.Gauge
	resident     prometheus.Gauge
	ingestTokens prometheus.Counter
	ingestDone   prometheus.Gauge
	ingestTotal  prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		promptTokens: prometheus.NewCounter(prometheus.CounterOpts{Name: "kvrecall_prompt_tokens_total",
			Help: "Prompt tokens evaluated (document tokens reused from pages are not counted)."}),
		genTokens:    prometheus.NewCounter(prometheus.CounterOpts{Name: "kvrecall_tokens_predicted_total", Help: "Tokens generated."}),
		cachedTokens: prometheus.NewCounter(prometheus.CounterOpts{Name: "kvrecall_prompt_tokens_cached_total", Help: "Document tokens served from pages instead of being evaluated."}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kvrecall_requests_total", Help: "Completed generation requests by route and outcome."},
			[]string{"route", "outcome"}),
		inFlight:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "kvrecall_requests_processing", Help: "Requests holding a generation slot."}),
		queued:       prometheus.NewGauge(prometheus.GaugeOpts{Name: "kvrecall_requests_deferred", Help: "Requests waiting for a slot."}),
		prefillTPS:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "kvrecall_prompt_tokens_seconds", Help: "Prompt evaluation speed of the last request (tokens/s)."}),
		decodeTPS:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "kvrecall_predicted_tokens_seconds", Help: "Generation speed of the last request (tokens/s)."}),
		resident:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "kvrecall_kv_resident_bytes", Help: "Device-resident KV bytes of the last request's session."}),
		ingestTokens: prometheus.NewCounter(prometheus.CounterOpts{Name: "kvrecall_ingest_tokens_total", Help: "Document tokens prefilled."}),
		ingestDone:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "kvrecall_ingest_progress_tokens", Help: "Tokens prefilled so far by ingests in progress."}),
		ingestTotal:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "kvrecall_ingest_target_tokens", Help: "Tokens to prefill by ingests in progress."}),
	}
	m.reg.MustRegister(m.promptTokens, m.genTokens, m.cachedTokens, m.requests, m.inFlight, m.queued,
		m.prefillTPS, m.decodeTPS, m.resident, m.ingestTokens, m.ingestDone, m.ingestTotal,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// attach registers the gauges that read the model's document store, and
// the device the model runs on.
func (m *metrics) attach(model *runtime.Model) {
	use := model.Device()
	d := use.Device
	dev := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "kvrecall_device_info",
		Help: "The device the model's offloaded layers run on (the CPU device when none is offloaded); always 1."},
		[]string{"device", "description", "backend", "kind", "loaded"})
	dev.WithLabelValues(d.Name, d.Description, d.Backend, string(d.Kind), fmt.Sprint(d.Loaded)).Set(1)
	m.reg.MustRegister(dev,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kvrecall_gpu_layers", Help: "Layers offloaded to the GPU, of kvrecall_model_layers (the output layer counts as one)."},
			func() float64 { return float64(use.GPULayers) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kvrecall_model_layers", Help: "The model's repeating layers plus its output layer."},
			func() float64 { return float64(use.Layers + 1) }),
	)
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kvrecall_kv_pages_host", Help: "Pages of documents loaded in host memory (all layers count as one page)."},
			func() float64 {
				n := 0
				for _, d := range model.LoadedDocuments() {
					n += d.Pages
				}
				return float64(n)
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kvrecall_kv_pages_disk", Help: "Pages of documents stored on disk."},
			func() float64 {
				infos, _ := model.Documents()
				n := 0
				for _, d := range infos {
					n += d.Pages
				}
				return float64(n)
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kvrecall_documents_host_bytes", Help: "Bytes of document pages held in host memory (bounded by --max-document-memory)."},
			func() float64 { return float64(model.DocumentMemory().Bytes) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "kvrecall_document_evictions_total", Help: "Documents dropped from host memory to keep within the bound; they reload from disk on next use."},
			func() float64 { return float64(model.DocumentMemory().Evictions) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kvrecall_documents", Help: "Documents stored on disk."},
			func() float64 {
				infos, _ := model.Documents()
				return float64(len(infos))
			}),
	)
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Outcomes of kvrecall_requests_total: refusals and cancellations are
// counted apart from failures, so that an alert on "error" means the server.
const (
	outcomeOK           = "ok"
	outcomeInvalid      = "invalid"       // 4xx: the request was refused
	outcomeBusy         = "busy"          // 429: queue full
	outcomeCancelled    = "cancelled"     // the client went away
	outcomeShutdown     = "shutdown"      // cancelled by the server's shutdown
	outcomeWriteTimeout = "write_timeout" // the client stopped reading
	outcomeError        = "error"         // 5xx
)

func (m *metrics) outcome(route, outcome string) {
	m.requests.WithLabelValues(route, outcome).Inc()
}

// record adds a generation's token counts and speeds.
func (m *metrics) record(res *runtime.Result, resident int64) {
	if res == nil {
		return
	}
	m.promptTokens.Add(float64(res.PromptTokens))
	m.genTokens.Add(float64(res.GeneratedTokens))
	m.cachedTokens.Add(float64(res.CachedTokens))
	if v := res.PrefillTokensPerSecond(); v > 0 {
		m.prefillTPS.Set(v)
	}
	if v := res.DecodeTokensPerSecond(); v > 0 {
		m.decodeTPS.Set(v)
	}
	if resident > 0 {
		m.resident.Set(float64(resident))
	}
}
