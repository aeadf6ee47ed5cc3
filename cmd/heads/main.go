// Command heads is `kvrecall heads` under its older name, kept for the scripts
// and docs that call it; see internal/cli/heads.
package main

import (
	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/internal/cli/heads"
)

func main() { cli.Main("heads", heads.Run) }
