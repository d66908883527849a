package main

import (
	"flag"
	"os"
	"strings"
	"testing"
)

// TestOperationsDocNamesEveryFlag keeps docs/operations.md in step with the
// flags of the two services: a flag added without documentation fails here.
func TestOperationsDocNamesEveryFlag(t *testing.T) {
	doc, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	for name, fs := range map[string]*flag.FlagSet{
		"credentials": func() *flag.FlagSet { fs, _, _, _ := credentialsFlags(); addCheckConfigFlag(fs); return fs }(),
		"gateway":     func() *flag.FlagSet { fs, _, _, _ := gatewayFlags(); addCheckConfigFlag(fs); return fs }(),
	} {
		fs.VisitAll(func(f *flag.Flag) {
			if !strings.Contains(string(doc), "`--"+f.Name+"`") && !strings.Contains(string(doc), "--"+f.Name+"`") {
				t.Errorf("%s flag --%s is not in docs/operations.md", name, f.Name)
			}
		})
	}
}
