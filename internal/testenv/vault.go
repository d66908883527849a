package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
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
	"runtime"
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
	(&vaultProc{cmd: vaultState.cmd, exited: vaultState.exited}).stop()
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

// VaultTLS starts a Vault dev server that serves only TLS (vault server
// -dev -dev-tls), with transit mounted, for t; it is stopped when t ends.
// Unlike Vault it is not shared, and its CA (CACert) lives in t's temporary
// directory. It takes a second or two to start.
func VaultTLS(t testing.TB) VaultServer {
	t.Helper()
	bin, err := findVaultBinary()
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
		p, err := startVaultProc(bin, logFile, certDir)
		if err == nil {
			t.Cleanup(p.stop)
			return p.server
		}
		if attempt == 3 {
			t.Fatalf("testenv: vault TLS dev server: %v\n--- tail of %s ---\n%s", err, logFile.Name(), vaultLogTail(logFile.Name()))
		}
	}
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
		p, err := startVaultProc(bin, logFile, "")
		if err == nil {
			vaultState.cmd, vaultState.exited = p.cmd, p.exited
			return p.server, nil
		}
		if attempt == 3 {
			return VaultServer{}, fmt.Errorf("%w\n--- tail of %s ---\n%s", err, logFile.Name(), vaultLogTail(logFile.Name()))
		}
	}
}

// vaultProc is a started and ready dev server.
type vaultProc struct {
	server VaultServer
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
}

func (p *vaultProc) stop() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// startVaultProc starts a dev server on a free loopback port, waits until
// it is ready and mounts transit. A non-empty tlsDir makes it a -dev-tls
// server writing its CA and certificate there.
func startVaultProc(bin string, logFile *os.File, tlsDir string) (*vaultProc, error) {
	port, err := vaultFreePort()
	if err != nil {
		return nil, err
	}
	hostPort := net.JoinHostPort("127.0.0.1", port)
	srv := VaultServer{Addr: "http://" + hostPort, RootToken: "root-" + vaultRandomHex(16)}
	args := []string{"server", "-dev",
		"-dev-root-token-id=" + srv.RootToken,
		"-dev-listen-address=" + hostPort,
		"-dev-no-store-token", // never overwrite the developer's ~/.vault-token
	}
	if tlsDir != "" {
		srv.Addr = "https://" + hostPort
		srv.CACert = filepath.Join(tlsDir, "vault-ca.pem")
		args = append(args, "-dev-tls", "-dev-tls-cert-dir="+tlsDir)
	}

	cmd := exec.Command(bin, args...)
	cmd.Env = vaultChildEnv()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Kill the server if the test binary dies without stopping it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	fmt.Fprintf(logFile, "--- %s (attempt on %s) ---\n", bin, hostPort)
	p := &vaultProc{server: srv, cmd: cmd, exited: make(chan struct{})}
	// Fork from a goroutine locked to its OS thread until the server exits:
	// Pdeathsig fires when the forking *thread* ends, and the runtime ends
	// a thread whose locked goroutine returns (RedisOwn's servers do, mid
	// run), which would kill a server forked earlier on that thread.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread exits with this goroutine, which
		// only returns after the child is gone.
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		_ = cmd.Wait()
		close(p.exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}

	client, err := waitVaultReady(srv, p.exited)
	if err != nil {
		p.stop()
		return nil, err
	}
	if err := vaultRequest(srv, client, http.MethodPost, "sys/mounts/transit", `{"type":"transit"}`); err != nil {
		p.stop()
		return nil, fmt.Errorf("enable transit: %w", err)
	}
	return p, nil
}

// VaultBinary returns the vault binary the dev servers run, for tests that
// drive the vault CLI itself (deploy/vault/init.sh); it fails the test if
// there is none.
func VaultBinary(t testing.TB) string {
	t.Helper()
	bin, err := findVaultBinary()
	if err != nil {
		t.Fatal(err)
	}
	return bin
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
// unsealed, the process exits, or vaultStartTimeout passes. It returns a
// client that trusts the server.
func waitVaultReady(srv VaultServer, exited <-chan struct{}) (*http.Client, error) {
	deadline := time.Now().Add(vaultStartTimeout)
	var client *http.Client
	for {
		if client == nil {
			client, _ = vaultHTTPClient(srv) // a TLS server writes its CA as it starts
		}
		if client != nil && vaultHealthy(client, srv) {
			return client, nil
		}
		select {
		case <-exited:
			return nil, errors.New("vault exited before it became ready")
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("vault not ready after %s", vaultStartTimeout)
		}
	}
}

// vaultHTTPClient returns a client for srv, trusting its CA if it has one.
func vaultHTTPClient(srv VaultServer) (*http.Client, error) {
	if srv.CACert == "" {
		return &http.Client{}, nil
	}
	pem, err := os.ReadFile(srv.CACert)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", srv.CACert)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: transport}, nil
}

func vaultHealthy(client *http.Client, srv VaultServer) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.Addr+"/v1/sys/health", nil)
	if err != nil {
		return false
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// vaultRequest sends one authenticated request with a JSON body.
func vaultRequest(srv VaultServer, client *http.Client, method, path, body string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, srv.Addr+"/v1/"+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("X-Vault-Token", srv.RootToken)
	resp, err := client.Do(req)
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
