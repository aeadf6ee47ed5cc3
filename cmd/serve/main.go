// Command serve is `kvrecall serve` under its older name, kept for the
// scripts and docs that call it; see internal/cli/serve.
package main

import (
	"context"

	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/internal/cli/serve"
)

func main() {
	cli.Main("serve", func(_ context.Context, args []string) error { return serve.Run(args) })
}
