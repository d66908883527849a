package launch

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
	"strconv"
	"strings"
	"time"
)

// VaultBinEnv names the environment variable that points at a vault binary.
const VaultBinEnv = "FLEETBROKER_VAULT_BIN"

// VaultStartTimeout bounds how long a dev server may take to answer
// sys/health; a cold start under -race on a busy CI box takes a few seconds.
const VaultStartTimeout = 60 * time.Second

// VaultBinary looks in $FLEETBROKER_VAULT_BIN, then PATH, then the place
// `make tools` installs to.
func VaultBinary() (string, error) {
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

// VaultChildEnv is this process's environment without VAULT_* variables, so
// a developer's own Vault settings cannot change how a server starts.
func VaultChildEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") {
			env = append(env, kv)
		}
	}
	return env
}

// VaultDev is a running `vault server -dev` child with transit mounted at
// "transit/".
type VaultDev struct {
	Addr      string // e.g. "http://127.0.0.1:41234"; https with TLS
	RootToken string
	// CACert is the PEM file of the CA that signed a TLS server's
	// certificate (for 127.0.0.1 and localhost); empty without TLS.
	CACert string
	Cmd    *exec.Cmd
	// Done is closed when the process has exited.
	Done <-chan struct{}
}

// StartVaultDev starts a dev server (in-memory storage) of bin on a free
// loopback port, its output to log, waits until it is ready and mounts
// transit. A non-empty tlsDir makes it a -dev-tls server writing its CA and
// certificate there.
func StartVaultDev(bin string, log io.Writer, tlsDir string) (*VaultDev, error) {
	ports, err := FreePorts(1)
	if err != nil {
		return nil, err
	}
	hostPort := net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))
	v := &VaultDev{Addr: "http://" + hostPort, RootToken: "root-" + RandomHex(16)}
	args := []string{"server", "-dev",
		"-dev-root-token-id=" + v.RootToken,
		"-dev-listen-address=" + hostPort,
		"-dev-no-store-token", // never overwrite the developer's ~/.vault-token
	}
	if tlsDir != "" {
		v.Addr = "https://" + hostPort
		v.CACert = filepath.Join(tlsDir, "vault-ca.pem")
		args = append(args, "-dev-tls", "-dev-tls-cert-dir="+tlsDir)
	}
	v.Cmd = exec.Command(bin, args...)
	v.Cmd.Env = VaultChildEnv()
	v.Cmd.Stdout, v.Cmd.Stderr = log, log
	fmt.Fprintf(log, "--- %s (attempt on %s) ---\n", bin, hostPort)
	if v.Done, err = Fork(v.Cmd, nil); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	client, err := v.waitReady()
	if err != nil {
		v.Stop()
		return nil, err
	}
	if err := VaultRequest(client, v.Addr, v.RootToken, http.MethodPost, "sys/mounts/transit", `{"type":"transit"}`); err != nil {
		v.Stop()
		return nil, fmt.Errorf("enable transit: %w", err)
	}
	return v, nil
}

// Stop kills the server and waits for it.
func (v *VaultDev) Stop() {
	_ = v.Cmd.Process.Kill()
	<-v.Done
}

// waitReady polls sys/health until the server is initialized and unsealed,
// the process exits, or VaultStartTimeout passes. It returns a client that
// trusts the server.
func (v *VaultDev) waitReady() (*http.Client, error) {
	deadline := time.Now().Add(VaultStartTimeout)
	var client *http.Client
	for {
		if client == nil {
			client, _ = VaultHTTPClient(v.CACert) // a TLS server writes its CA as it starts
		}
		if client != nil && VaultHealthy(client, v.Addr) {
			return client, nil
		}
		select {
		case <-v.Done:
			return nil, errors.New("vault exited before it became ready")
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("vault not ready after %s", VaultStartTimeout)
		}
	}
}

// VaultHTTPClient returns a client for a server, trusting caCert (a PEM
// file) if it is set.
func VaultHTTPClient(caCert string) (*http.Client, error) {
	if caCert == "" {
		return &http.Client{}, nil
	}
	pem, err := os.ReadFile(caCert)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", caCert)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: transport}, nil
}

// VaultHealthy tells whether the server at addr answers sys/health as an
// initialized, unsealed, active node.
func VaultHealthy(client *http.Client, addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, addr+"/v1/sys/health", nil)
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

// VaultRequest sends one request with token and a JSON body to the server
// at addr.
func VaultRequest(client *http.Client, addr, token, method, path, body string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, addr+"/v1/"+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("X-Vault-Token", token)
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

// RandomHex is n random bytes in hex: tokens and unique names.
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails since Go 1.24
	return hex.EncodeToString(b)
}
