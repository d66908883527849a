package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// VaultBinEnv names the environment variable that points at a vault binary.
const VaultBinEnv = "FLEETBROKER_VAULT_BIN"

// vaultStartTimeout bounds how long a dev server may take to answer
// sys/health; a cold start under -race on a busy CI box takes a few seconds.
const vaultStartTimeout = 60 * time.Second

// VaultServer is a running Vault dev server with the transit engine mounted
// at "transit/". It is shared by every test in the binary: use a fresh key
// name per test (NewKeyName) so tests stay independent.
type VaultServer struct {
	Addr      string // e.g. "http://127.0.0.1:41234"
	RootToken string
}

// vaultState is the one dev server of this test binary.
var vaultState struct {
	once    sync.Once
	server  VaultServer
	err     error
	cmd     *exec.Cmd
	exited  chan struct{} // closed when cmd has been waited for
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
	if vaultState.cmd == nil {
		return
	}
	_ = vaultState.cmd.Process.Kill()
	<-vaultState.exited
	vaultState.cmd = nil
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
	return "t-" + strings.Trim(name, "-") + "-" + vaultRandomHex(4)
}

func startVault() (VaultServer, error) {
	bin, err := findVaultBinary()
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
		srv, err := startVaultOnce(bin, logFile)
		if err == nil {
			return srv, nil
		}
		if attempt == 3 {
			return VaultServer{}, fmt.Errorf("%w\n--- tail of %s ---\n%s", err, logFile.Name(), vaultLogTail(logFile.Name()))
		}
	}
}

func startVaultOnce(bin string, logFile *os.File) (VaultServer, error) {
	port, err := vaultFreePort()
	if err != nil {
		return VaultServer{}, err
	}
	hostPort := net.JoinHostPort("127.0.0.1", port)
	srv := VaultServer{Addr: "http://" + hostPort, RootToken: "root-" + vaultRandomHex(16)}

	cmd := exec.Command(bin, "server", "-dev",
		"-dev-root-token-id="+srv.RootToken,
		"-dev-listen-address="+hostPort,
		"-dev-no-store-token", // never overwrite the developer's ~/.vault-token
	)
	cmd.Env = vaultChildEnv()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Kill the server if the test binary dies without calling StopVault.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(logFile, "--- %s (attempt on %s) ---\n", bin, hostPort)
	if err := cmd.Start(); err != nil {
		return VaultServer{}, fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()

	if err := waitVaultReady(srv, exited); err != nil {
		_ = cmd.Process.Kill()
		<-exited
		return VaultServer{}, err
	}
	if err := vaultRequest(srv, http.MethodPost, "sys/mounts/transit", `{"type":"transit"}`); err != nil {
		_ = cmd.Process.Kill()
		<-exited
		return VaultServer{}, fmt.Errorf("enable transit: %w", err)
	}
	vaultState.cmd, vaultState.exited = cmd, exited
	return srv, nil
}

// findVaultBinary looks in $FLEETBROKER_VAULT_BIN, then PATH, then the
// place `make tools` installs to.
func findVaultBinary() (string, error) {
	if bin := os.Getenv(VaultBinEnv); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			return "", fmt.Errorf("%s=%s: %w (unset it to use the vault that `make tools` builds)", VaultBinEnv, bin, err)
		}
		return bin, nil
	}
	if bin, err := exec.LookPath("vault"); err == nil {
		return bin, nil
	}
	var tried string
	if home, err := os.UserHomeDir(); err == nil {
		tried = filepath.Join(home, ".cache", "fleetbroker", "tools", "bin", "vault")
		if _, err := os.Stat(tried); err == nil {
			return tried, nil
		}
	}
	return "", fmt.Errorf("no vault binary: set %s, put vault on PATH, or run `make tools` "+
		"(builds Vault from tools/vault into %s)", VaultBinEnv, tried)
}

// vaultChildEnv drops VAULT_* variables so a developer's own Vault settings
// cannot change how the dev server starts.
func vaultChildEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") {
			env = append(env, kv)
		}
	}
	return env
}

// waitVaultReady polls sys/health until the server is initialized and
// unsealed, the process exits, or vaultStartTimeout passes.
func waitVaultReady(srv VaultServer, exited <-chan struct{}) error {
	deadline := time.Now().Add(vaultStartTimeout)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get(srv.Addr + "/v1/sys/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-exited:
			return errors.New("vault exited before it became ready")
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("vault not ready after %s", vaultStartTimeout)
		}
	}
}

// vaultRequest sends one authenticated request with a JSON body.
func vaultRequest(srv VaultServer, method, path, body string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, srv.Addr+"/v1/"+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("X-Vault-Token", srv.RootToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s %s: status %d: %s", method, path, resp.StatusCode, bytes.TrimSpace(msg))
	}
	return nil
}

func vaultFreePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	_, port, err := net.SplitHostPort(l.Addr().String())
	return port, err
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

func vaultRandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails since Go 1.24
	return hex.EncodeToString(b)
}
