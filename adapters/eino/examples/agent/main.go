// Command agent is an eino agent over a long document. It ingests a file
// once with kvrecall, then works through a queue of questions: for each,
// the model calls the tool read_next_question, the tool's answer goes back
// to it, and it answers from the document, streamed. It prints each
// question's time to first token and, from the usage of every model call,
// that no call prefilled the document again (the document's tokens are
// reused, only the chat turns are evaluated).
//
// Without flags it needs no download: it builds the foundry's recall model
// once into $KVRECALL_MODELS (the model `make demo` uses) plus a copy with
// a small chat template (recall-agent-v1.gguf) so that it can be offered
// tools, writes a generated haystack with hidden needles as the long file,
// and asks the needles' questions. The recall model is constructed, not
// trained: it cannot decide to call a tool, so the agent's first step in
// each question forces the call (a forced call is generated under a
// grammar); the answer step lets the model choose.
//
//	go run ./examples/agent                       # the recall model, a 16k-token haystack
//	go run ./examples/agent --model qwen.gguf --file book.txt --question "Who wrote the letter?" --question "..."
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cloudwego/eino/components/model"
	"github.com/cloudwego/eino/components/tool"
	"github.com/cloudwego/eino/components/tool/utils"
	"github.com/cloudwego/eino/compose"
	"github.com/cloudwego/eino/schema"
	fsggml "github.com/ollama/ollama/fs/ggml"

	"github.com/kvrecall/kvrecall"
	kveino "github.com/kvrecall/kvrecall/adapters/eino"
	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
)

func main() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
	var cfg config
	var questions multi
	flag.StringVar(&cfg.Model, "model", "", "GGUF model with a chat template (default: the foundry's recall model with one, built if absent)")
	flag.StringVar(&cfg.File, "file", "", "the long text file to ingest (default: a generated haystack for the recall model)")
	flag.Var(&questions, "question", "a question for the queue (repeatable; default: the haystack's questions)")
	flag.IntVar(&cfg.Length, "length", 16384, "haystack length in tokens (default file only)")
	flag.IntVar(&cfg.Needles, "needles", 3, "needles hidden in the haystack, one question each (default file only)")
	flag.Uint64Var(&cfg.Seed, "seed", uint64(time.Now().UnixNano()), "haystack seed")
	flag.IntVar(&cfg.Threads, "threads", 0, "CPU threads (default: all)")
	flag.StringVar(&cfg.Method, "method", "retro", "paging method of every question")
	flag.IntVar(&cfg.Budget, "budget", 2048, "tokens each query attends to")
	flag.IntVar(&cfg.MaxTokens, "max-tokens", 0, "answer length cap (default: 3 for the recall model, 256 otherwise)")
	flag.BoolVar(&cfg.Force, "force-tool", true, "force the tool call in each question's first step")
	flag.Parse()
	cfg.Questions = questions
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "agent: unexpected arguments %v\n", flag.Args())
		os.Exit(2)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := run(ctx, cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		os.Exit(1)
	}
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, "; ") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

type config struct {
	Model, File        string
	Questions          []string
	Length, Needles    int
	Seed               uint64
	Threads            int
	Method             string
	Budget, MaxTokens  int
	Force              bool
	DataDir, ModelsDir string // tests set these; "" = a temporary folder, foundry.ModelsDir()
}

// question is what the agent did for one question.
type question struct {
	Question, Answer, Want string           // Want: the needle's answer ("" with a user file)
	FirstToken             time.Duration    // from the question to the answer's first token
	ToolStep               time.Duration    // from the question to the tool's result
	Calls                  []kvrecall.Usage // every model call of the question
}

// agentTemplate is the recall-agent model's chat template: the tools'
// names, then the turns' contents (the assistant's tool calls are not
// written back). The recall model answers a question that ends the
// prompt, here the tool's answer.
const agentTemplate = `{% if tools %}{% for t in tools %}{{ t.function.name }} {% endfor %}
{% endif %}{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}`

// agentModel returns the recall-agent model in dir: the foundry's recall
// model with agentTemplate. Its name carries a version so that a changed
// template never hides behind a cached file.
func agentModel(dir string) (string, error) {
	notify := func(p string) { fmt.Printf("Building %s (once) ...\n", p) }
	recall, err := foundry.EnsureRecall(dir, notify)
	if err != nil {
		return "", err
	}
	return foundry.Ensure(dir, "recall-agent-v1.gguf", func(p string) error {
		return gguf.Copy(recall, p, func(kv fsggml.KV, ts []*fsggml.Tensor) ([]*fsggml.Tensor, error) {
			kv["tokenizer.chat_template"] = agentTemplate
			return ts, nil
		})
	}, notify)
}

// toolTokens is the token limit of a forced call: the recall model spells
// JSON byte by byte.
const toolTokens = 256

func run(ctx context.Context, cfg config, w io.Writer) ([]question, error) {
	tmp, err := os.MkdirTemp("", "kvrecall-agent-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if cfg.DataDir == "" {
		cfg.DataDir = filepath.Join(tmp, "data")
	}
	recall := cfg.Model == ""
	if recall {
		dir := cfg.ModelsDir
		if dir == "" {
			if dir, err = foundry.ModelsDir(); err != nil {
				return nil, err
			}
		}
		if cfg.Model, err = agentModel(dir); err != nil {
			return nil, err
		}
	}
	// A small instance of the model tokenizes: the haystack's words, and
	// the file's length, which sizes the context (the document, one
	// question's turns and its answer).
	tok, err := kvrecall.Open(ctx, cfg.Model, kvrecall.Options{Threads: 1, ContextLength: 512, DataDir: filepath.Join(tmp, "tokenizer")})
	if err != nil {
		return nil, err
	}
	defer tok.Close()
	var wants []string
	if cfg.File == "" {
		if !recall {
			return nil, errors.New("--file is required with --model (the generated haystack is for the recall model)")
		}
		cfg.File = filepath.Join(tmp, "haystack.txt")
		var qs []string
		if qs, wants, err = writeHaystack(cfg, tok, cfg.File); err != nil {
			return nil, err
		}
		if len(cfg.Questions) == 0 {
			cfg.Questions = qs
		} else {
			wants = nil
		}
	}
	if len(cfg.Questions) == 0 {
		return nil, errors.New("no questions: pass --question")
	}
	if cfg.MaxTokens == 0 {
		cfg.MaxTokens = 256
		if recall {
			cfg.MaxTokens = 3 // the needles' answers are three words
		}
	}
	text, err := os.ReadFile(cfg.File)
	if err != nil {
		return nil, err
	}
	docTokens, err := tok.CountTokens(string(text))
	if err != nil {
		return nil, err
	}
	tok.Close()
	m, err := kvrecall.Open(ctx, cfg.Model, kvrecall.Options{Threads: cfg.Threads, ContextLength: docTokens + 512 + cfg.MaxTokens,
		DataDir: cfg.DataDir, Method: cfg.Method, Budget: cfg.Budget})
	if err != nil {
		return nil, err
	}
	defer m.Close()
	fmt.Fprintf(w, "Model %s\n", cfg.Model)

	t0 := time.Now()
	doc, err := m.Ingest(ctx, "", string(text), kvrecall.IngestOptions{})
	if err != nil {
		return nil, err
	}
	in := doc.Info()
	fmt.Fprintf(w, "Ingested %s once: %d tokens in %s, %d pages in RAM and on disk.\n",
		filepath.Base(cfg.File), in.Tokens, time.Since(t0).Round(time.Millisecond), in.Pages)

	// The tool: a queue of questions.
	queue := append([]string(nil), cfg.Questions...)
	next, err := utils.InferTool("read_next_question", "Returns the next question about the document in the queue.",
		func(context.Context, struct{}) (string, error) {
			if len(queue) == 0 {
				return "", errors.New("the queue is empty")
			}
			q := queue[0]
			queue = queue[1:]
			return q, nil
		})
	if err != nil {
		return nil, err
	}
	tools, err := compose.NewToolNode(ctx, &compose.ToolsNodeConfig{Tools: []tool.BaseTool{next}})
	if err != nil {
		return nil, err
	}
	info, err := next.Info(ctx)
	if err != nil {
		return nil, err
	}
	base, err := kveino.New(m, kveino.Config{Document: doc.ID(), MaxTokens: cfg.MaxTokens})
	if err != nil {
		return nil, err
	}
	cm, err := base.WithTools([]*schema.ToolInfo{info})
	if err != nil {
		return nil, err
	}

	var out []question
	for i := range cfg.Questions {
		q := question{}
		if wants != nil {
			q.Want = wants[i]
		}
		start := time.Now()
		msgs := []*schema.Message{schema.UserMessage("Answer the next question in the queue.")}
		for step := 0; ; step++ {
			if step == 4 {
				return out, fmt.Errorf("question %d: no answer after %d steps", i+1, step)
			}
			var opts []model.Option
			if step == 0 && cfg.Force {
				// A call's JSON takes more tokens than the answer may.
				opts = append(opts, model.WithToolChoice(schema.ToolChoiceForced), model.WithMaxTokens(max(cfg.MaxTokens, toolTokens)))
				if recall {
					// Greedy, the constructed model fills each gap between
					// JSON tokens with all the white space the grammar
					// allows (about 230 tokens for the call; a repeat
					// penalty does not move it); sampled, about 60.
					opts = append(opts, kveino.WithSampling(kvrecall.Sampling{Temperature: 0.5, Seed: 2}))
				}
			}
			sr, err := cm.Stream(ctx, msgs, opts...)
			if err != nil {
				return out, err
			}
			var chunks []*schema.Message
			var answer strings.Builder
			for {
				c, err := sr.Recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					sr.Close()
					return out, fmt.Errorf("question %d: %w", i+1, err)
				}
				if c.Content != "" {
					if answer.Len() == 0 {
						q.FirstToken = time.Since(start)
						fmt.Fprint(w, "   answer:")
					}
					fmt.Fprint(w, c.Content)
					answer.WriteString(c.Content)
				}
				chunks = append(chunks, c)
			}
			sr.Close()
			msg, err := schema.ConcatMessages(chunks)
			if err != nil {
				return out, err
			}
			u, _ := msg.Extra[kveino.ExtraUsage].(kvrecall.Usage)
			q.Calls = append(q.Calls, u)
			if len(msg.ToolCalls) == 0 {
				q.Answer = answer.String()
				break
			}
			results, err := tools.Invoke(ctx, msg)
			if err != nil {
				return out, fmt.Errorf("question %d: tool: %w", i+1, err)
			}
			for _, r := range results {
				if r.ToolName == info.Name {
					q.Question = r.Content
					fmt.Fprintf(w, "Q%d (from %s): %s\n", i+1, info.Name, q.Question)
				}
			}
			q.ToolStep = time.Since(start)
			msgs = append(msgs, msg)
			msgs = append(msgs, results...)
		}
		verdict := ""
		if q.Want != "" {
			verdict = "  (correct)"
			if q.Answer != q.Want {
				verdict = fmt.Sprintf("  (WRONG, expected %q)", q.Want)
			}
		}
		fmt.Fprintf(w, "%s\n   time to first token %s (tool step %s); %d model calls, each reusing the document's %d tokens and evaluating only",
			verdict, q.FirstToken.Round(time.Millisecond), q.ToolStep.Round(time.Millisecond), len(q.Calls), in.Tokens)
		for j, u := range q.Calls {
			sep := ","
			if j == 0 {
				sep = ""
			}
			fmt.Fprintf(w, "%s %d", sep, u.PromptTokens-u.CachedTokens)
		}
		fmt.Fprintln(w, " prompt tokens")
		out = append(out, q)
	}
	reprefill := false
	for _, q := range out {
		for _, u := range q.Calls {
			reprefill = reprefill || u.CachedTokens != in.Tokens
		}
	}
	if reprefill {
		return out, errors.New("a call did not reuse the whole document")
	}
	fmt.Fprintf(w, "No question prefilled the document again: every call reused its %d tokens.\n", in.Tokens)
	return out, nil
}

// writeHaystack writes a haystack of the recall model's filler words with
// needles at random depths and returns their questions and answers.
func writeHaystack(cfg config, m *kvrecall.Model, path string) (questions, answers []string, err error) {
	f, err := gguf.Open(cfg.Model)
	if err != nil {
		return nil, nil, err
	}
	voc, err := haystack.LoadVocab(f)
	if err != nil {
		return nil, nil, err
	}
	words := func(ids []int32) string { s, _ := m.Detokenize(ids); return strings.TrimPrefix(s, " ") }
	r := rand.New(rand.NewPCG(cfg.Seed, 2))
	depths := make([]float64, cfg.Needles)
	for i := range depths {
		depths[i] = (float64(i) + r.Float64()) / float64(cfg.Needles) // one per slice of the text
	}
	c, err := voc.NewCase(cfg.Length, depths, cfg.Seed)
	if err != nil {
		return nil, nil, err
	}
	for _, n := range c.Needles {
		questions = append(questions, words(voc.Question(n)))
		answers = append(answers, " "+words(n.Values))
	}
	return questions, answers, os.WriteFile(path, []byte(words(c.Tokens[1:])), 0o644)
}
