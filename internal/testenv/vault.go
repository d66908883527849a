package testenv

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// VaultBinEnv names the environment variable that points at a vault binary.
const VaultBinEnv = launch.VaultBinEnv

// vaultStartTimeout bounds how long a server may take to answer sys/health.
const vaultStartTimeout = launch.VaultStartTimeout

// VaultServer is a running Vault dev server with the transit engine mounted
// at "transit/". It is shared by every test in the binary: use a fresh key
// name per test (NewKeyName) so tests stay independent.
type VaultServer struct {
	Addr      string // e.g. "http://127.0.0.1:41234"; https for VaultTLS
	RootToken string
	// CACert is the PEM file of the CA that signed the server's
	// certificate (for 127.0.0.1 and localhost); VaultTLS only.
	CACert string
}

// vaultState is the one dev server of this test binary.
var vaultState struct {
	once    sync.Once
	server  VaultServer
	err     error
	proc    *launch.VaultDev
	logPath string
	stopMu  sync.Mutex
}

// Vault returns the test binary's Vault dev server, starting it on first
// use. A missing vault binary or a failed start fails the test; it never
// skips.
func Vault(t testing.TB) VaultServer {
	t.Helper()
	vaultState.once.Do(func() {
		vaultState.server, vaultState.err = startVault()
	})
	if vaultState.err != nil {
		t.Fatalf("testenv: vault dev server: %v", vaultState.err)
	}
	return vaultState.server
}

// StopVault kills the dev server, if one was started, and removes its log
// file. Call it after m.Run; it is safe to call more than once. If it is
// not called, the server still dies with the test binary (Pdeathsig).
func StopVault() {
	vaultState.stopMu.Lock()
	defer vaultState.stopMu.Unlock()
	if vaultState.proc == nil {
		return
	}
	vaultState.proc.Stop()
	vaultState.proc = nil
	_ = os.Remove(vaultState.logPath)
}

var vaultKeyNameUnsafe = regexp.MustCompile(`[^A-Za-z0-9_-]+`)

// NewKeyName returns a transit key name no other test uses. It contains a
// readable part of the test's name, for debugging, and a random suffix.
func (VaultServer) NewKeyName(t testing.TB) string {
	t.Helper()
	name := vaultKeyNameUnsafe.ReplaceAllString(t.Name(), "-")
	if len(name) > 48 {
		name = name[len(name)-48:]
	}
	return "t-" + strings.Trim(name, "-") + "-" + launch.RandomHex(4)
}

// VaultTLS starts a Vault dev server that serves only TLS (vault server
// -dev -dev-tls), with transit mounted, for t; it is stopped when t ends.
// Unlike Vault it is not shared, and its CA (CACert) lives in t's temporary
// directory. It takes a second or two to start.
func VaultTLS(t testing.TB) VaultServer {
	t.Helper()
	bin, err := launch.VaultBinary()
	if err != nil {
		t.Fatalf("testenv: vault TLS dev server: %v", err)
	}
	dir := t.TempDir()
	logFile, err := os.Create(filepath.Join(dir, "vault.log"))
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer logFile.Close()
	for attempt := 1; ; attempt++ {
		certDir, err := os.MkdirTemp(dir, "tls-") // fresh for each attempt
		if err != nil {
			t.Fatalf("testenv: %v", err)
		}
		p, err := launch.StartVaultDev(bin, logFile, certDir)
		if err == nil {
			t.Cleanup(p.Stop)
			return vaultServer(p)
		}
		if attempt == 3 {
			t.Fatalf("testenv: vault TLS dev server: %v\n--- tail of %s ---\n%s", err, logFile.Name(), vaultLogTail(logFile.Name()))
		}
	}
}

func startVault() (VaultServer, error) {
	bin, err := launch.VaultBinary()
	if err != nil {
		return VaultServer{}, err
	}
	logFile, err := os.CreateTemp("", "fleetbroker-vault-*.log")
	if err != nil {
		return VaultServer{}, err
	}
	defer logFile.Close() // the child has its own descriptor
	vaultState.logPath = logFile.Name()

	// The free port can be taken between probing and Vault binding it, so
	// retry a few times on a fresh port before giving up.
	for attempt := 1; ; attempt++ {
		p, err := launch.StartVaultDev(bin, logFile, "")
		if err == nil {
			vaultState.proc = p
			return vaultServer(p), nil
		}
		if attempt == 3 {
			return VaultServer{}, fmt.Errorf("%w\n--- tail of %s ---\n%s", err, logFile.Name(), vaultLogTail(logFile.Name()))
		}
	}
}

// vaultServer is what the tests see of a dev server.
func vaultServer(p *launch.VaultDev) VaultServer {
	return VaultServer{Addr: p.Addr, RootToken: p.RootToken, CACert: p.CACert}
}

// VaultBinary returns the vault binary the dev servers run, for tests that
// drive the vault CLI itself (deploy/vault/init.sh); it fails the test if
// there is none.
func VaultBinary(t testing.TB) string {
	t.Helper()
	bin, err := launch.VaultBinary()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// vaultLogTail returns the last lines of the server log, for failure
// messages.
func vaultLogTail(path string) string {
	const maxBytes = 4096
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	if len(data) > maxBytes {
		data = data[len(data)-maxBytes:]
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			data = data[i+1:]
		}
	}
	return string(data)
}
