// Package layering checks the tree's architecture as STYLE.md draws it:
// proto/ → gen/ → services/<name>/ → cmd/fleetbroker. The shared packages
// under internal/ sit below the services: a service may use them, never
// the other way round. Composition roots, which import services, live
// under cmd/ (cmd/fleetbroker/app, the bench) or test/ (test/testserver).
//
// Run it with `make layering`.
package layering

import (
	"bufio"
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/fleetbroker/fleetbroker/"

// TestInternalImportsNoService: no package under internal/ depends, directly
// or through another package, on a package under services/ or cmd/. It
// reads `go list -deps` of every internal package — the check anyone can
// run by hand:
//
//	go list -f '{{.ImportPath}}: {{join .Deps " "}}' ./internal/... | grep -E '/(services|cmd)/'
func TestInternalImportsNoService(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Deps}} {{.}}{{end}}`, module+"internal/...").Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("go list: %v\n%s", err, stderr)
	}
	checked := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 1<<20), 16<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		pkg, deps := fields[0], fields[1:]
		checked++
		for _, dep := range deps {
			if above(dep) {
				t.Errorf("%s depends on %s: internal/ packages sit below the services and the composition roots", pkg, dep)
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	// The pattern must have matched the tree: a check of nothing passes.
	if checked < 10 {
		t.Fatalf("go list named %d internal packages; the pattern no longer matches the tree", checked)
	}
}

// above reports whether dep is a package an internal/ package must not use.
func above(dep string) bool {
	return strings.HasPrefix(dep, module+"services/") || strings.HasPrefix(dep, module+"cmd/") || strings.HasPrefix(dep, module+"test/")
}

// TestAbove: the rule itself, on names either side of the line.
func TestAbove(t *testing.T) {
	tests := []struct {
		dep  string
		want bool
	}{
		{module + "services/gateway", true},
		{module + "services/credentials/store", true},
		{module + "cmd/fleetbroker/app", true},
		{module + "test/testserver", true},
		{module + "internal/transit", false},
		{module + "gen/go/fleetbroker/credentials/v1", false},
		{"github.com/redis/go-redis/v9", false},
	}
	for _, tt := range tests {
		if got := above(tt.dep); got != tt.want {
			t.Errorf("above(%q) = %v, want %v", tt.dep, got, tt.want)
		}
	}
}
