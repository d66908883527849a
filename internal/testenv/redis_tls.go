package testenv

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// RedisTLSUser is the ACL user of every RedisTLS server.
const RedisTLSUser = "app"

// RedisTLSServer is a redis-server that speaks only TLS and admits only one
// ACL user, the default user being disabled: the way managed and hardened
// deployments run.
type RedisTLSServer struct {
	// Addr is host:port of the TLS listener on loopback; there is no
	// plaintext port.
	Addr string
	// PKI signed the server's certificate, which is valid for localhost
	// and 127.0.0.1. Client certificates are optional, but one presented
	// must be signed by PKI, so a test can tell whether a client sends it.
	PKI *PKI
	// Username and Password are the only user's; the password is random.
	Username, Password string
}

// RedisTLS starts a TLS-only redis-server for t, stopped when t ends.
// Unlike Redis it is not shared by the test binary: its certificates live
// in t's PKI, whose directory is removed when t ends. It starts in tens of
// milliseconds.
func RedisTLS(t testing.TB) RedisTLSServer {
	t.Helper()
	bin, err := launch.RedisBinary()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	pki := NewPKI(t)
	certFile, keyFile := pki.Issue(t, "redis-server", IssueOptions{Server: true})
	secret := make([]byte, 16)
	if _, err := rand.Read(secret); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	s := RedisTLSServer{PKI: pki, Username: RedisTLSUser, Password: hex.EncodeToString(secret)}
	probeTLS := s.TLSConfig(t)
	p, err := launch.StartRedis(bin, redisSpec{
		Role: "TLS redis-server",
		Args: func(dir string, ports []int) ([]string, error) {
			// The users go in a file, not the command line, where every
			// local user could read the password in the process list.
			conf := filepath.Join(dir, "redis.conf")
			acl := "user default off resetpass -@all\n" +
				"user " + s.Username + " on >" + s.Password + " ~* &* +@all\n"
			if err := os.WriteFile(conf, []byte(acl), 0o600); err != nil {
				return nil, err
			}
			return append([]string{conf}, append(launch.RedisBaseArgs(dir),
				"--port", "0",
				"--tls-port", strconv.Itoa(ports[0]),
				"--tls-cert-file", certFile,
				"--tls-key-file", keyFile,
				"--tls-ca-cert-file", pki.CAFile(),
				"--tls-auth-clients", "optional",
			)...), nil
		},
		Probe: func(addr string) error {
			return launch.RedisProbe(func() (net.Conn, error) {
				return tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", addr, probeTLS)
			}, s.Username, s.Password)
		},
	}, time.Now().Add(redisReadyTimeout))
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(p.Stop)
	s.Addr = p.Addr
	return s
}

// TLSConfig returns a client configuration that trusts s's CA and presents
// no client certificate.
func (s RedisTLSServer) TLSConfig(t testing.TB) *tls.Config {
	t.Helper()
	pem, err := os.ReadFile(s.PKI.CAFile())
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatalf("testenv: no certificate in %s", s.PKI.CAFile())
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
}

// Client returns a client logged in as s's user over verified TLS, closed
// when t ends. ContextTimeoutEnabled is on.
func (s RedisTLSServer) Client(t testing.TB) redis.UniversalClient {
	t.Helper()
	c := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:                 []string{s.Addr},
		Username:              s.Username,
		Password:              s.Password,
		TLSConfig:             s.TLSConfig(t),
		ContextTimeoutEnabled: true,
	})
	t.Cleanup(func() { _ = c.Close() })
	return c
}
