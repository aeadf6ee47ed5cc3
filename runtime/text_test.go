package runtime

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestTextOutHoldsBackStopStrings(t *testing.T) {
	cases := []struct {
		name   string
		pieces []string
		stop   []string
		out    []string // released per piece
		hit    int      // index of the piece that completes a stop string, -1 if none
		rest   string
	}{
		{"no stops", []string{"a", "b"}, nil, []string{"a", "b"}, -1, ""},
		{"stop inside piece", []string{"hello wor", "ld!"}, []string{"world"}, []string{"hello ", ""}, 1, ""},
		{"prefix held then released", []string{"the cat", " sat"}, []string{"cats"}, []string{"the ", "cat sat"}, -1, ""},
		{"held at the end is flushed", []string{"ab", "c"}, []string{"cd"}, []string{"ab", ""}, -1, "c"},
		{"two stops, earliest wins", []string{"x END y STOP"}, []string{"STOP", "END"}, []string{"x "}, 0, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := &textOut{stop: c.stop}
			hitAt := -1
			for i, p := range c.pieces {
				s, hit := o.add(p)
				require.Equal(t, c.out[i], s, "piece %d", i)
				if hit {
					hitAt = i
					break
				}
			}
			require.Equal(t, c.hit, hitAt)
			if hitAt < 0 {
				require.Equal(t, c.rest, o.flush())
			}
		})
	}
}

func TestStreamDecoderReassemblesUTF8(t *testing.T) {
	for _, s := range []string{"é", "😀", "漢字", "aé😀b"} {
		var d streamDecoder
		var sb strings.Builder
		for i := 0; i < len(s); i++ {
			out := d.add(s[i : i+1])
			require.True(t, strings.ToValidUTF8(out, "") == out, "partial character released: %q", out)
			sb.WriteString(out)
		}
		sb.WriteString(d.flush())
		require.Equal(t, s, sb.String())
	}
	var d streamDecoder
	require.Equal(t, "", d.add("\xe2\x82"))
	require.Equal(t, "\uFFFD", d.flush(), "a dangling partial character is replaced, not dropped silently")
}
