package paging

import (
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Factory builds a fresh selector (one per session) from a filled,
// checked config.
type Factory func(c Config) (Selector, error)

// Modifier wraps a method's selector: "retro+heads" is the heads modifier
// applied to a retro selector.
type Modifier func(inner Selector, c Config) (Selector, error)

var registry = struct {
	sync.RWMutex
	methods   map[string]Factory
	modifiers map[string]Modifier
}{methods: map[string]Factory{}, modifiers: map[string]Modifier{}}

// Register makes a method available by name to New, the CLI, the server
// and the benchmarks. Packages call it from init. It panics on an empty,
// malformed or duplicate name, as database/sql.Register does.
func Register(name string, f Factory) {
	checkName(name)
	registry.Lock()
	defer registry.Unlock()
	if _, dup := registry.methods[name]; dup || registry.modifiers[name] != nil {
		panic("paging: Register called twice for " + name)
	}
	registry.methods[name] = f
}

// RegisterModifier makes a modifier available as the "+name" suffix of a
// method name.
func RegisterModifier(name string, m Modifier) {
	checkName(name)
	registry.Lock()
	defer registry.Unlock()
	if _, dup := registry.modifiers[name]; dup || registry.methods[name] != nil {
		panic("paging: RegisterModifier called twice for " + name)
	}
	registry.modifiers[name] = m
}

func checkName(name string) {
	if name == "" || strings.ContainsAny(name, "+, \t") {
		panic(fmt.Sprintf("paging: bad method name %q", name))
	}
}

// Names lists the registered methods, sorted.
func Names() []string {
	registry.RLock()
	defer registry.RUnlock()
	var out []string
	for n := range registry.methods {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Modifiers lists the registered modifiers, sorted.
func Modifiers() []string {
	registry.RLock()
	defer registry.RUnlock()
	var out []string
	for n := range registry.modifiers {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Known describes the registered names for error messages and help texts:
// "dense, quest, retro, window (modifiers: +heads)".
func Known() string {
	s := strings.Join(Names(), ", ")
	if m := Modifiers(); len(m) > 0 {
		s += " (modifiers: +" + strings.Join(m, ", +") + ")"
	}
	return s
}

// Parse splits a method spec "retro+heads" into its method and modifiers
// and checks that each is registered.
func Parse(spec string) (method string, modifiers []string, err error) {
	parts := strings.Split(spec, "+")
	registry.RLock()
	_, ok := registry.methods[parts[0]]
	bad, dup := "", ""
	for i, m := range parts[1:] {
		if _, isMod := registry.modifiers[m]; !isMod && bad == "" {
			bad = m
		}
		if slices.Contains(parts[1:i+1], m) && dup == "" {
			dup = m
		}
	}
	registry.RUnlock()
	if !ok {
		return "", nil, fmt.Errorf("paging: unknown method %q (known: %s)", spec, Known())
	}
	if bad != "" {
		return "", nil, fmt.Errorf("paging: unknown modifier %q in %q (known: %s)", bad, spec, Known())
	}
	if dup != "" {
		return "", nil, fmt.Errorf("paging: modifier %q is given twice in %q", dup, spec)
	}
	return parts[0], parts[1:], nil
}

// New builds a fresh selector for spec ("quest", "retro+heads") under c.
func New(spec string, c Config) (Selector, error) {
	c, err := c.Fill()
	if err != nil {
		return nil, err
	}
	method, mods, err := Parse(spec)
	if err != nil {
		return nil, err
	}
	registry.RLock()
	f := registry.methods[method]
	var ms []Modifier
	for _, m := range mods {
		ms = append(ms, registry.modifiers[m])
	}
	registry.RUnlock()
	s, err := f(c)
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		if s, err = m(s, c); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func init() {
	Register("dense", func(c Config) (Selector, error) { return &dense{c}, nil })
	Register("window", func(c Config) (Selector, error) {
		if err := c.CheckBudget(); err != nil {
			return nil, err
		}
		return &window{c}, nil
	})
	Register("quest", func(c Config) (Selector, error) { return NewScored("quest", c, questScorer{}, 0) })
	Register("retro", func(c Config) (Selector, error) { return NewScored("retro", c, retroScorer{}, c.Neighbors) })
}
