package kvcache

import (
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/x448/float16"
)

var testLayout = Layout{Layers: 2, KVHeads: 2, HeadDim: 8, PageSize: 16}

// rows returns n random f16 rows of the layout.
func rows(r *rand.Rand, l Layout, n int) []uint16 {
	out := make([]uint16, n*l.Row())
	for i := range out {
		out[i] = float16.Fromfloat32(float32(r.NormFloat64())).Bits()
	}
	return out
}

func fill(t *testing.T, s *Store, r *rand.Rand, n, batch int) (k, v [][]uint16) {
	k = make([][]uint16, s.L.Layers)
	v = make([][]uint16, s.L.Layers)
	for done := 0; done < n; done += batch {
		b := min(batch, n-done)
		s.grow(done + b)
		for l := 0; l < s.L.Layers; l++ {
			kr, vr := rows(r, s.L, b), rows(r, s.L, b)
			s.write(l, done, kr, vr, b)
			k[l] = append(k[l], kr...)
			v[l] = append(v[l], vr...)
		}
		s.n = done + b
	}
	return k, v
}

// The incremental summaries equal a summary computed from scratch.
func TestSummariesMatchRecomputation(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	s, err := NewStore(testLayout)
	require.NoError(t, err)
	k, _ := fill(t, s, r, 70, 7) // pages of 16: four full, one of 6
	require.Equal(t, 5, s.Pages())
	row := testLayout.Row()
	for l := 0; l < 2; l++ {
		for p := 0; p < 5; p++ {
			pg := s.Page(l, p)
			n := min(16, 70-p*16)
			require.Equal(t, n, pg.N)
			for i := 0; i < row; i++ {
				var sum float64
				mn, mx := math.Inf(1), math.Inf(-1)
				for tk := 0; tk < n; tk++ {
					x := float64(f16(k[l][(p*16+tk)*row+i]))
					sum += x
					mn, mx = math.Min(mn, x), math.Max(mx, x)
				}
				require.InDelta(t, sum/float64(n), pg.Mean[i], 1e-5)
				require.Equal(t, float32(mn), pg.Min[i])
				require.Equal(t, float32(mx), pg.Max[i])
			}
			if n == 16 {
				require.Equal(t, Reps, pg.NReps, "closed pages have representative keys")
			} else {
				require.Zero(t, pg.NReps)
			}
		}
	}
}

// Representative keys are the keys least like the rest of their page: a key
// orthogonal to every other key is picked first.
func TestRepresentativeKeysFindOutliers(t *testing.T) {
	l := Layout{Layers: 1, KVHeads: 1, HeadDim: 8, PageSize: 16}
	s, _ := NewStore(l)
	s.grow(16)
	r := rand.New(rand.NewPCG(9, 9))
	k := make([]uint16, 16*8)
	for tk := 0; tk < 16; tk++ {
		for d := 0; d < 8; d++ {
			x := float32(0)
			if d < 6 { // "filler" lives in dims 0..5, with random directions
				x = float32(r.NormFloat64())
			}
			if tk == 9 { // the needle lives in dims 6..7 only
				x = map[bool]float32{true: 2, false: 0}[d >= 6]
			}
			k[tk*8+d] = float16.Fromfloat32(x).Bits()
		}
	}
	s.write(0, 0, k, k, 16)
	pg := s.Page(0, 0)
	require.Equal(t, []float32{0, 0, 0, 0, 0, 0, 2, 2}, pg.RepKeys[:8])
}

// Every key shares a large component (a flag that is -4 on all but one
// token, as the recall model's salience channel); the one key that flips it
// must still be a representative. Its cosine with every other key is large
// and negative, which squared cosines of the raw keys count as similarity:
// without centring on the page's mean it is never picked.
func TestRepresentativeKeysFindFlippedFlag(t *testing.T) {
	l := Layout{Layers: 1, KVHeads: 1, HeadDim: 8, PageSize: 16}
	s, _ := NewStore(l)
	s.grow(16)
	r := rand.New(rand.NewPCG(3, 4))
	k := make([]uint16, 16*8)
	const needle = 11
	for tk := 0; tk < 16; tk++ {
		for d := 0; d < 7; d++ {
			k[tk*8+d] = float16.Fromfloat32(float32(r.NormFloat64())).Bits()
		}
		flag := float32(-4)
		if tk == needle {
			flag = 4
		}
		k[tk*8+7] = float16.Fromfloat32(flag).Bits()
	}
	s.write(0, 0, k, k, 16)
	pg := s.Page(0, 0)
	found := false
	for j := 0; j < pg.NReps; j++ {
		found = found || pg.RepKeys[j*8+7] == 4
	}
	require.True(t, found, "the key with the flipped flag is a representative: %v", pg.RepKeys)
}

func TestForkCopiesOnWriteAndTruncates(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	doc, _ := NewStore(testLayout)
	fill(t, doc, r, 40, 40)
	before := append([]uint16(nil), doc.Page(0, 2).K...)
	f := doc.Fork()
	require.Equal(t, 40, f.Len())
	f.grow(45)
	f.write(0, 40, rows(r, testLayout, 5), rows(r, testLayout, 5), 5)
	f.write(1, 40, rows(r, testLayout, 5), rows(r, testLayout, 5), 5)
	f.n = 45
	require.Equal(t, before, doc.Page(0, 2).K, "the document's partial page is untouched")
	require.Equal(t, 8, doc.Page(0, 2).N)
	require.Equal(t, 13, f.Page(0, 2).N)
	require.Same(t, doc.Page(0, 0), f.Page(0, 0), "full pages stay shared")

	f.truncate(35)
	require.Equal(t, 35, f.Len())
	require.Equal(t, 3, f.Pages())
	require.Equal(t, 3, f.Page(1, 2).N)
	require.Equal(t, 8, doc.Page(1, 2).N, "truncating a fork never changes the document")
	f.truncate(32)
	require.Equal(t, 2, f.Pages())
}

func TestPageFileRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	s, _ := NewStore(testLayout)
	fill(t, s, r, 50, 13)
	toks := make([]int32, 50)
	for i := range toks {
		toks[i] = int32(i * 3)
	}
	fp := Fingerprint{1, 2, 3}
	path := filepath.Join(t.TempDir(), "doc.kvp")
	require.NoError(t, WritePageFile(path, s, toks, fp))
	got, gotToks, info, err := ReadPageFile(path, &testLayout)
	require.NoError(t, err)
	require.Equal(t, toks, gotToks)
	require.Equal(t, fp, info.Fingerprint)
	require.Equal(t, 50, got.Len())
	for l := 0; l < 2; l++ {
		for p := 0; p < s.Pages(); p++ {
			a, b := s.Page(l, p), got.Page(l, p)
			require.Equal(t, a.K, b.K)
			require.Equal(t, a.V, b.V)
			require.Equal(t, a.N, b.N)
			require.Equal(t, a.Min, b.Min)
			require.Equal(t, a.Max, b.Max)
			require.Equal(t, a.Mean, b.Mean)
			require.Equal(t, a.NReps, b.NReps)
			if a.NReps > 0 {
				require.Equal(t, a.RepKeys, b.RepKeys)
			}
		}
	}
}

func TestPageFileCorruptionIsDetected(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	s, _ := NewStore(testLayout)
	fill(t, s, r, 50, 50)
	toks := make([]int32, 50)
	dir := t.TempDir()
	good := filepath.Join(dir, "good.kvp")
	require.NoError(t, WritePageFile(good, s, toks, Fingerprint{}))
	data, err := os.ReadFile(good)
	require.NoError(t, err)
	cases := []struct {
		name string
		edit func([]byte) []byte
		want string
	}{
		{"truncated", func(b []byte) []byte { return b[:len(b)-100] }, "truncated"},
		{"extended", func(b []byte) []byte { return append(b, 0) }, "size"},
		{"flipped page byte", func(b []byte) []byte { b[len(b)-500] ^= 0x40; return b }, "page 3 checksum mismatch"},
		{"flipped token byte", func(b []byte) []byte { b[headerSize+3] ^= 1; return b }, "token checksum"},
		{"flipped header byte", func(b []byte) []byte { b[12] ^= 1; return b }, "header checksum"},
		{"not a page file", func([]byte) []byte {
			return []byte(strings.Repeat("hello world, this is not a page file. ", 4))
		}, "not a kvrecall page file"},
		{"empty", func([]byte) []byte { return nil }, "truncated header"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".kvp")
			require.NoError(t, os.WriteFile(p, c.edit(append([]byte(nil), data...)), 0o644))
			_, _, _, err := ReadPageFile(p, &testLayout)
			require.Error(t, err)
			require.True(t, errors.Is(err, ErrCorrupt), "%v", err)
			require.ErrorContains(t, err, c.want)
			require.ErrorContains(t, err, p)
		})
	}
	other := testLayout
	other.HeadDim = 16
	_, _, _, err = ReadPageFile(good, &other)
	require.ErrorContains(t, err, "does not match")
}

// A layer view's packed boxes follow every change of the pages: appends into
// a partial page, a fork's copy-on-write, truncation inside a page and
// regrowth to the same length with other keys.
func TestPackedBoxesFollowWrites(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 9))
	s, _ := NewStore(testLayout)
	views := []*layerView{{s: s, layer: 0}, {s: s, layer: 1}}
	check := func(step string) {
		t.Helper()
		hd := s.L.HeadDim
		for _, v := range views {
			for g := 0; g < s.L.KVHeads; g++ {
				packed := v.PackedBoxes(g)
				require.Len(t, packed, s.Pages()*2*hd, step)
				for p := 0; p < s.Pages(); p++ {
					c, rad := v.Box(p, g)
					require.Equal(t, c, packed[p*2*hd:p*2*hd+hd], "%s: layer %d page %d head %d center", step, v.layer, p, g)
					require.Equal(t, rad, packed[p*2*hd+hd:(p+1)*2*hd], "%s: radius", step)
				}
			}
		}
	}
	grow := func(n int) {
		from := s.n
		s.grow(n)
		for l := 0; l < s.L.Layers; l++ {
			s.write(l, from, rows(r, s.L, n-from), rows(r, s.L, n-from), n-from)
		}
		s.n = n
	}
	grow(20)
	check("20 tokens")
	grow(21)
	check("one more token in the partial page")
	grow(40)
	check("40 tokens")
	s.truncate(35)
	check("truncated inside page 2")
	grow(40)
	check("regrown to 40 with other keys")
	s.truncate(16)
	check("truncated to one page")

	doc := s
	grow(40)
	s = doc.Fork()
	views = []*layerView{{s: s, layer: 0}, {s: s, layer: 1}}
	check("fork")
	grow(44)
	check("fork after copy-on-write of its partial page")
}
