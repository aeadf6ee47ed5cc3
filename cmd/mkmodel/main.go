// Command mkmodel is `kvrecall mkmodel` under its older name, kept for the
// scripts and docs that call it; see internal/cli/mkmodel.
package main

import (
	"context"

	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/internal/cli/mkmodel"
)

func main() {
	cli.Main("mkmodel", func(_ context.Context, args []string) error { return mkmodel.Run(args) })
}
