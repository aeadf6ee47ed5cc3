// Command demo is `kvrecall demo` under its older name, kept for the scripts
// and docs that call it; see internal/cli/demo.
package main

import (
	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/internal/cli/demo"
)

func main() { cli.Main("demo", demo.Run) }
