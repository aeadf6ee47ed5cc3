// Command bench is `kvrecall bench` under its older name, kept for the scripts
// and docs that call it; see internal/cli/bench.
package main

import (
	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/internal/cli/bench"
)

func main() { cli.Main("bench", bench.Run) }
