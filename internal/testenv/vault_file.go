package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// VaultFileServer is a real `vault server` — not dev mode — on file storage
// in a directory of its own, for fault tests: it can be stopped (Vault
// down), sealed, and restarted on the same address and storage, where it
// comes back sealed with everything it stored, as a production Vault does.
// It starts uninitialized; Init initializes and unseals it (one key share)
// and mounts transit, or a test drives deploy/vault/init.sh against it.
// Unlike Vault it is not shared: each call of VaultFile starts one for t,
// stopped when t ends.
type VaultFileServer struct {
	// Addr is e.g. "http://127.0.0.1:41234"; it stays the same across
	// restarts.
	Addr string
	// RootToken and UnsealKey are set by Init.
	RootToken string
	UnsealKey string

	bin, dir, hostPort, logPath string

	mu   sync.Mutex
	proc *fileVaultProc // nil while stopped
}

// fileVaultProc is one run of the server process.
type fileVaultProc struct {
	cmd    *exec.Cmd
	exited <-chan struct{}
}

// VaultFile starts an uninitialized Vault server on file storage for t.
func VaultFile(t testing.TB) *VaultFileServer {
	t.Helper()
	bin, err := launch.VaultBinary()
	if err != nil {
		t.Fatalf("testenv: vault file server: %v", err)
	}
	dir := t.TempDir()
	s := &VaultFileServer{bin: bin, dir: dir, logPath: filepath.Join(dir, "vault.log")}
	for attempt := 1; ; attempt++ {
		ports, err := launch.FreePorts(1)
		if err != nil {
			t.Fatalf("testenv: %v", err)
		}
		s.hostPort = net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))
		s.Addr = "http://" + s.hostPort
		if err = s.writeConfig(); err == nil {
			err = s.start()
		}
		if err == nil {
			break
		}
		if attempt == 3 { // the port may have been taken between probe and bind
			t.Fatalf("testenv: vault file server: %v\n--- tail of %s ---\n%s", err, s.logPath, vaultLogTail(s.logPath))
		}
	}
	t.Cleanup(s.kill)
	return s
}

func (s *VaultFileServer) writeConfig() error {
	conf := fmt.Sprintf(`storage "file" {
  path = %q
}
listener "tcp" {
  address     = %q
  tls_disable = true
}
disable_mlock = true
`, filepath.Join(s.dir, "data"), s.hostPort)
	return os.WriteFile(filepath.Join(s.dir, "vault.hcl"), []byte(conf), 0o600)
}

// start runs the server and waits until it answers (sealed or not).
func (s *VaultFileServer) start() error {
	logFile, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child has its own descriptor
	cmd := exec.Command(s.bin, "server", "-config="+filepath.Join(s.dir, "vault.hcl"))
	cmd.Env = launch.VaultChildEnv()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	fmt.Fprintf(logFile, "--- %s on %s ---\n", s.bin, s.hostPort)
	exited, err := launch.Fork(cmd, nil)
	if err != nil {
		return fmt.Errorf("start %s: %w", s.bin, err)
	}
	p := &fileVaultProc{cmd: cmd, exited: exited}
	deadline := time.Now().Add(vaultStartTimeout)
	for {
		if _, err := s.sealStatus(); err == nil {
			break
		}
		select {
		case <-p.exited:
			return errors.New("vault exited before it answered")
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-p.exited
			return fmt.Errorf("vault not answering after %s", vaultStartTimeout)
		}
	}
	s.mu.Lock()
	s.proc = p
	s.mu.Unlock()
	return nil
}

// Start starts the stopped server again on the same address and storage.
// It comes back sealed.
func (s *VaultFileServer) Start(t testing.TB) {
	t.Helper()
	if err := s.start(); err != nil {
		t.Fatalf("testenv: restart vault: %v\n--- tail of %s ---\n%s", err, s.logPath, vaultLogTail(s.logPath))
	}
}

// Stop stops the server (SIGTERM, as an orchestrator does; SIGKILL after
// 10 s). Clients get connection refused until Start.
func (s *VaultFileServer) Stop(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p == nil {
		t.Fatal("testenv: vault is not running")
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// Restart stops and starts the server; it comes back sealed.
func (s *VaultFileServer) Restart(t testing.TB) {
	t.Helper()
	s.Stop(t)
	s.Start(t)
}

func (s *VaultFileServer) kill() {
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p != nil {
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// Init initializes the server with one key share, unseals it and mounts
// transit at "transit/", recording RootToken and UnsealKey.
func (s *VaultFileServer) Init(t testing.TB) {
	t.Helper()
	var resp struct {
		Keys      []string `json:"keys_base64"`
		RootToken string   `json:"root_token"`
	}
	if err := s.do(http.MethodPut, "sys/init", "", `{"secret_shares":1,"secret_threshold":1}`, &resp); err != nil {
		t.Fatalf("testenv: vault init: %v", err)
	}
	if len(resp.Keys) != 1 || resp.RootToken == "" {
		t.Fatal("testenv: vault init returned no key or no root token")
	}
	s.UnsealKey, s.RootToken = resp.Keys[0], resp.RootToken
	s.Unseal(t)
	if err := s.do(http.MethodPost, "sys/mounts/transit", s.RootToken, `{"type":"transit"}`, nil); err != nil {
		t.Fatalf("testenv: enable transit: %v", err)
	}
}

// Unseal unseals the server with UnsealKey and waits until it is active.
func (s *VaultFileServer) Unseal(t testing.TB) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"key": s.UnsealKey})
	if err := s.do(http.MethodPut, "sys/unseal", "", string(body), nil); err != nil {
		t.Fatalf("testenv: vault unseal: %v", err)
	}
	s.WaitActive(t)
}

// Seal seals the running server.
func (s *VaultFileServer) Seal(t testing.TB) {
	t.Helper()
	if err := s.do(http.MethodPut, "sys/seal", s.RootToken, "", nil); err != nil {
		t.Fatalf("testenv: vault seal: %v", err)
	}
}

// Sealed reports whether the server answers and is sealed.
func (s *VaultFileServer) Sealed(t testing.TB) bool {
	t.Helper()
	st, err := s.sealStatus()
	if err != nil {
		t.Fatalf("testenv: vault seal status: %v", err)
	}
	return st.Sealed
}

// WaitActive waits until the server answers sys/health as an initialized,
// unsealed, active node (it takes a moment after unsealing).
func (s *VaultFileServer) WaitActive(t testing.TB) {
	t.Helper()
	client := &http.Client{}
	deadline := time.Now().Add(vaultStartTimeout)
	for !launch.VaultHealthy(client, s.Addr) {
		if time.Now().After(deadline) {
			t.Fatalf("testenv: vault not active after %s\n--- tail of %s ---\n%s", vaultStartTimeout, s.logPath, vaultLogTail(s.logPath))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type vaultSealStatus struct {
	Initialized bool `json:"initialized"`
	Sealed      bool `json:"sealed"`
}

func (s *VaultFileServer) sealStatus() (vaultSealStatus, error) {
	var st vaultSealStatus
	err := s.do(http.MethodGet, "sys/seal-status", "", "", &st)
	return st, err
}

// do sends one request; out, if not nil, receives the JSON answer (the
// sys/ endpoints used here answer at the top level, not under "data").
func (s *VaultFileServer) do(method, path, token, body string, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, s.Addr+"/v1/"+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("X-Vault-Token", token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: status %d", method, path, resp.StatusCode)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}
