package kvrecall_test

import (
	"go/ast"
	"go/build"
	"go/parser"
	"go/token"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall"
	"github.com/kvrecall/kvrecall/runtime"
)

const self = "github.com/kvrecall/kvrecall"

// allowed reports whether the exported API may mention a type of package
// path: the standard library (no dot in the first element) and this package.
func allowed(path string) bool {
	first, _, _ := strings.Cut(path, "/")
	return path == "" || path == self || !strings.Contains(first, ".")
}

// TestExportedAPIUsesNoEngineTypes walks every exported declaration of the
// package's source (so nothing can be forgotten) and every type reachable
// from its exported types by reflection (so aliases, promoted fields and
// methods are seen as they really are): neither may reach a type from
// ollama, ggml's ml packages or kvrecall's engine packages.
func TestExportedAPIUsesNoEngineTypes(t *testing.T) {
	t.Run("source", func(t *testing.T) {
		bad := exportedImports(t, ".")
		require.Empty(t, bad, "exported declarations mention packages outside the standard library")
	})
	t.Run("reflection", func(t *testing.T) {
		roots := []any{kvrecall.Open, kvrecall.Methods, &kvrecall.Model{}, &kvrecall.Document{}, kvrecall.Options{},
			kvrecall.GenerateOptions{}, kvrecall.Response{}, kvrecall.Chunk{}, kvrecall.Message{}, kvrecall.ModelInfo{},
			kvrecall.DocumentInfo{}, kvrecall.IngestOptions{}, kvrecall.Tool{}, kvrecall.ToolCall{}, kvrecall.ErrToolCall, &kvrecall.OpenError{}, kvrecall.ErrClosed, kvrecall.ErrNoDocument, kvrecall.ErrContextFull}
		var bad []string
		seen := map[reflect.Type]bool{}
		for _, r := range roots {
			bad = append(bad, foreignTypes(reflect.TypeOf(r), seen, reflect.TypeOf(r).String())...)
		}
		require.Empty(t, bad)
	})
	// The walkers can fail: the engine's own API is full of such types.
	t.Run("walkers catch engine types", func(t *testing.T) {
		require.NotEmpty(t, exportedImports(t, "runtime"))
		bad := foreignTypes(reflect.TypeOf(&runtime.Model{}), map[reflect.Type]bool{}, "runtime.Model")
		require.True(t, slicesContain(bad, "github.com/ollama/ollama/ml"), "%v", bad)
	})
}

func slicesContain(list []string, sub string) bool {
	for _, s := range list {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// foreignTypes lists the types reachable from t (exported fields, exported
// methods, elements, function signatures) whose package is not allowed.
func foreignTypes(t reflect.Type, seen map[reflect.Type]bool, where string) []string {
	if seen[t] {
		return nil
	}
	seen[t] = true
	if !allowed(t.PkgPath()) {
		return []string{where + ": " + t.PkgPath() + "." + t.Name()}
	}
	if t.PkgPath() != "" && t.PkgPath() != self {
		return nil // a standard library type
	}
	var out []string
	for i := range t.NumMethod() {
		m := t.Method(i)
		out = append(out, foreignTypes(m.Type, seen, where+"."+m.Name)...)
	}
	switch t.Kind() {
	case reflect.Pointer, reflect.Slice, reflect.Array, reflect.Chan:
		out = append(out, foreignTypes(t.Elem(), seen, where)...)
	case reflect.Map:
		out = append(out, foreignTypes(t.Key(), seen, where)...)
		out = append(out, foreignTypes(t.Elem(), seen, where)...)
	case reflect.Func:
		for i := range t.NumIn() {
			out = append(out, foreignTypes(t.In(i), seen, where)...)
		}
		for i := range t.NumOut() {
			out = append(out, foreignTypes(t.Out(i), seen, where)...)
		}
	case reflect.Struct:
		for i := range t.NumField() {
			if f := t.Field(i); f.IsExported() || f.Anonymous {
				out = append(out, foreignTypes(f.Type, seen, where+"."+f.Name)...)
			}
		}
	}
	return out
}

// exportedImports parses the package in dir (the files the build uses) and
// lists each package outside the standard library that an exported
// declaration's type mentions.
func exportedImports(t *testing.T, dir string) []string {
	bp, err := build.ImportDir(dir, 0)
	require.NoError(t, err)
	fset := token.NewFileSet()
	var bad []string
	for _, name := range bp.GoFiles {
		f, err := parser.ParseFile(fset, dir+"/"+name, nil, parser.SkipObjectResolution)
		require.NoError(t, err)
		imports := map[string]string{}
		for _, im := range f.Imports {
			p, _ := strconv.Unquote(im.Path.Value)
			n := p[strings.LastIndex(p, "/")+1:]
			if im.Name != nil {
				n = im.Name.Name
			}
			imports[n] = p
		}
		check := func(where string, n ast.Node) {
			if n == nil {
				return
			}
			ast.Inspect(n, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.FuncLit, *ast.BlockStmt:
					return false // bodies are not the API
				case *ast.StructType:
					for _, f := range n.Fields.List {
						if len(f.Names) == 0 || f.Names[0].IsExported() {
							ast.Inspect(f.Type, func(n ast.Node) bool { return inspectSel(n, imports, where, &bad) })
						}
					}
					return false
				}
				return inspectSel(n, imports, where, &bad)
			})
		}
		for _, d := range f.Decls {
			switch d := d.(type) {
			case *ast.FuncDecl:
				if !d.Name.IsExported() {
					continue
				}
				if d.Recv != nil {
					rt := d.Recv.List[0].Type
					if s, ok := rt.(*ast.StarExpr); ok {
						rt = s.X
					}
					if id, ok := rt.(*ast.Ident); ok && !id.IsExported() {
						continue
					}
				}
				check(d.Name.Name, d.Type)
			case *ast.GenDecl:
				for _, s := range d.Specs {
					switch s := s.(type) {
					case *ast.TypeSpec:
						if s.Name.IsExported() {
							check(s.Name.Name, s.Type)
						}
					case *ast.ValueSpec:
						if s.Names[0].IsExported() {
							check(s.Names[0].Name, s.Type)
						}
					}
				}
			}
		}
	}
	return bad
}

func inspectSel(n ast.Node, imports map[string]string, where string, bad *[]string) bool {
	if sel, ok := n.(*ast.SelectorExpr); ok {
		if id, ok := sel.X.(*ast.Ident); ok {
			if p, ok := imports[id.Name]; ok && !allowed(p) {
				*bad = append(*bad, where+": "+p+"."+sel.Sel.Name)
			}
		}
	}
	return true
}
