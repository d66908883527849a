package transit_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

func TestVaultAuthConfigInvalid(t *testing.T) {
	const addr = "http://127.0.0.1:1" // never dialled: validation comes first
	tests := []struct {
		name string
		cfg  transit.VaultConfig
		want string
	}{
		{"no address", transit.VaultConfig{Token: "t"}, "address is required"},
		{"no token", transit.VaultConfig{Addr: addr}, "auth method token needs a token"},
		{"unknown method", transit.VaultConfig{Addr: addr, Auth: transit.Auth{Method: "ldap"}},
			`unknown auth method "ldap" (want token, approle or kubernetes)`},
		{"approle without files", transit.VaultConfig{Addr: addr, Auth: transit.Auth{Method: "approle"}},
			"auth method approle needs a role_id file and a secret_id file"},
		{"approle without secret_id", transit.VaultConfig{Addr: addr, Auth: transit.Auth{Method: "approle", RoleIDFile: "r"}},
			"auth method approle needs a secret_id file"},
		{"kubernetes without role", transit.VaultConfig{Addr: addr, Auth: transit.Auth{Method: "kubernetes"}},
			"auth method kubernetes needs a kubernetes role"},
		{"approle settings with the token method", transit.VaultConfig{Addr: addr, Token: "t",
			Auth: transit.Auth{RoleIDFile: "r", SecretIDFile: "s", SecretIDWrapped: true}},
			"role_id file, secret_id file, secret_id wrapping set, but the auth method is token"},
		{"mount path with the token method", transit.VaultConfig{Addr: addr, Token: "t", Auth: transit.Auth{MountPath: "approle"}},
			"auth mount path set, but the auth method is token"},
		{"kubernetes settings with approle", transit.VaultConfig{Addr: addr,
			Auth: transit.Auth{Method: "approle", RoleIDFile: "r", SecretIDFile: "s", KubernetesRole: "k", KubernetesTokenPath: "p"}},
			"kubernetes role, kubernetes token path set, but the auth method is approle"},
		{"approle settings with kubernetes", transit.VaultConfig{Addr: addr,
			Auth: transit.Auth{Method: "kubernetes", KubernetesRole: "k", SecretIDWrapped: true}},
			"secret_id wrapping set, but the auth method is kubernetes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := transit.NewVault(t.Context(), tc.cfg, nil)
			if !errors.Is(err, transit.ErrInvalid) {
				t.Fatalf("NewVault = %v, want ErrInvalid", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

// Without a token path, the kubernetes method reads the token Kubernetes
// mounts into every pod.
func TestVaultKubernetesDefaultTokenPath(t *testing.T) {
	cfg := transit.VaultConfig{Addr: "http://" + closedAddr(t), Auth: transit.Auth{Method: "kubernetes", KubernetesRole: "broker"}}
	_, err := transit.NewVault(t.Context(), cfg, nil)
	if _, statErr := os.Stat(transit.DefaultKubernetesTokenPath); statErr == nil {
		// In a pod: the file is read, and the login fails for want of a Vault.
		if !errors.Is(err, transit.ErrUnavailable) {
			t.Fatalf("NewVault in a pod = %v, want ErrUnavailable", err)
		}
		return
	}
	if !errors.Is(err, transit.ErrInvalid) {
		t.Fatalf("NewVault = %v, want ErrInvalid", err)
	}
	if !strings.Contains(err.Error(), transit.DefaultKubernetesTokenPath) {
		t.Errorf("error %q does not name %s", err, transit.DefaultKubernetesTokenPath)
	}
}

// authMounts serializes enabling auth methods: parallel tests share the
// dev server.
var authMounts sync.Mutex

// enableAuth mounts an auth method of kind at path unless something is
// mounted there already (an earlier test, or -count=2).
func enableAuth(t *testing.T, root *api.Client, path, kind string) {
	t.Helper()
	authMounts.Lock()
	defer authMounts.Unlock()
	mounts, err := root.Sys().ListAuthWithContext(t.Context())
	if err != nil {
		t.Fatalf("list auth mounts: %v", err)
	}
	if _, ok := mounts[path+"/"]; ok {
		return
	}
	if err := root.Sys().EnableAuthWithOptionsWithContext(t.Context(), path, &api.EnableAuthOptions{Type: kind}); err != nil {
		t.Fatalf("enable auth %s at %s: %v", kind, path, err)
	}
}

// encryptPolicy creates a policy that may encrypt with key, and returns
// its name.
func encryptPolicy(t *testing.T, root *api.Client, key string) string {
	t.Helper()
	name := "encrypt-" + key
	rules := fmt.Sprintf("path \"transit/encrypt/%s\" { capabilities = [\"update\"] }\n", key)
	if err := root.Sys().PutPolicyWithContext(t.Context(), name, rules); err != nil {
		t.Fatalf("put policy: %v", err)
	}
	return name
}

// write puts data in a new file in dir, readable by the owner only.
func write(t *testing.T, dir, name, data string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func vaultWrite(t *testing.T, c *api.Client, path string, data map[string]any) *api.Secret {
	t.Helper()
	s, err := c.Logical().WriteWithContext(t.Context(), path, data)
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	return s
}

// appRole is an AppRole role on the dev server whose tokens may encrypt
// with one key, and the files a service reads to log in as it.
type appRole struct {
	mount, name      string
	roleID, secretID string // secretID is the wrapping token if wrapped
	roleIDFile       string
	secretIDFile     string
}

// newAppRole creates the role at auth/<mount> with tokens of the given ttl
// and max ttl, and writes its role_id and a secret_id (response-wrapped if
// wrapped) to files.
func newAppRole(t *testing.T, root *api.Client, mount, key, ttl, maxTTL string, wrapped bool) appRole {
	t.Helper()
	enableAuth(t, root, mount, "approle")
	r := appRole{mount: mount, name: key}
	rolePath := "auth/" + mount + "/role/" + r.name
	vaultWrite(t, root, rolePath, map[string]any{
		"token_policies":     []string{encryptPolicy(t, root, key)},
		"token_ttl":          ttl,
		"token_max_ttl":      maxTTL,
		"secret_id_num_uses": 0, // unlimited: the service logs in again
	})
	s, err := root.Logical().ReadWithContext(t.Context(), rolePath+"/role-id")
	if err != nil || s == nil {
		t.Fatalf("read role-id: %v", err)
	}
	r.roleID = s.Data["role_id"].(string)
	if wrapped {
		r.secretID = wrappedSecretID(t, root, rolePath)
	} else {
		r.secretID = vaultWrite(t, root, rolePath+"/secret-id", nil).Data["secret_id"].(string)
	}
	dir := t.TempDir()
	r.roleIDFile = write(t, dir, "role-id", r.roleID+"\n")
	r.secretIDFile = write(t, dir, "secret-id", r.secretID+"\n")
	return r
}

// wrappedSecretID makes a secret_id for the role and returns the
// response-wrapping token that holds it.
func wrappedSecretID(t *testing.T, root *api.Client, rolePath string) string {
	t.Helper()
	c, err := root.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(root.Token())
	c.SetWrappingLookupFunc(func(operation, path string) string { return "5m" })
	s := vaultWrite(t, c, rolePath+"/secret-id", nil)
	if s.WrapInfo == nil || s.WrapInfo.Token == "" {
		t.Fatal("secret-id response is not wrapped")
	}
	return s.WrapInfo.Token
}

func (r appRole) auth() transit.Auth {
	return transit.Auth{Method: "approle", RoleIDFile: r.roleIDFile, SecretIDFile: r.secretIDFile, MountPath: r.mount}
}

// revokeLogins revokes every token made by logins at auth/<mount>.
func revokeLogins(t *testing.T, root *api.Client, mount string) {
	t.Helper()
	if err := root.Sys().RevokePrefixWithContext(t.Context(), "auth/"+mount+"/login"); err != nil {
		t.Fatalf("revoke logins at %s: %v", mount, err)
	}
}

// eventually retries f until it succeeds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-t.Context().Done():
			t.Fatalf("%s: test cancelled", what)
		}
	}
}

func encryptOnce(v *transit.Vault) func() error {
	return func() error {
		_, err := v.Encrypt(context.Background(), "tenant-a", []transit.Item{{Plaintext: []byte(secretText)}})
		return err
	}
}

func logsTo(buf *syncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// The role's tokens live 3s and at most 6s. The service renews its token
// until the max TTL, then logs in again and keeps working; a control token
// from the same role, never renewed past it, shows the max TTL is real.
func TestVaultAppRoleLogsInAgainAtMaxTTL(t *testing.T) {
	t.Parallel()
	srv := testenv.Vault(t)
	_, key := newKeyedVault(t, srv)
	root := rootClient(t, srv)
	role := newAppRole(t, root, "approle", key, "3s", "6s", false) // the default mount

	var logs syncBuffer
	auth := role.auth()
	auth.MountPath = "" // default: approle
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: auth}, logsTo(&logs))
	if err := encryptOnce(v)(); err != nil {
		t.Fatalf("Encrypt after login: %v", err)
	}
	if n := v.Logins(); n != 1 {
		t.Fatalf("Logins() = %d after NewVault, want 1", n)
	}

	// The control token is renewed as often as possible; it still dies at
	// the max TTL.
	control := loginAppRole(t, root, role)
	controlStart := time.Now()
	eventually(t, 10*time.Second, "control token expiry", func() error {
		if _, err := control.Auth().Token().RenewSelfWithContext(t.Context(), 0); err == nil {
			return errors.New("control token still valid")
		}
		return nil
	})
	if lived := time.Since(controlStart); lived < 5*time.Second {
		t.Fatalf("the control token died after %s, before its max TTL: the test proves nothing", lived)
	}
	// No calls until the new login: a refused call would also prompt one.
	eventually(t, 5*time.Second, "a second login", func() error {
		if n := v.Logins(); n < 2 {
			return fmt.Errorf("Logins() = %d", n)
		}
		return nil
	})
	if err := encryptOnce(v)(); err != nil {
		t.Errorf("Encrypt after the first token's max TTL: %v", err)
	}
	t.Logf("logs:\n%s", logs.String())
	for _, want := range []string{"vault token renewed", "cannot be renewed any further (max TTL", "logged in to vault"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("logs do not say %q", want)
		}
	}
	assertNoLeak(t, logs.String(), role.roleID, role.secretID, control.Token())
}

// loginAppRole logs in as role with a plain client.
func loginAppRole(t *testing.T, root *api.Client, role appRole) *api.Client {
	t.Helper()
	c, err := root.Clone()
	if err != nil {
		t.Fatal(err)
	}
	s := vaultWrite(t, c, "auth/"+role.mount+"/login", map[string]any{"role_id": role.roleID, "secret_id": role.secretID})
	c.SetToken(s.Auth.ClientToken)
	return c
}

// A response-wrapped secret_id is unwrapped once; the service keeps it and
// logs in with it again after its token was revoked, although the file
// still holds the used wrapping token.
func TestVaultAppRoleWrappedSecretID(t *testing.T) {
	t.Parallel()
	srv := testenv.Vault(t)
	_, key := newKeyedVault(t, srv)
	root := rootClient(t, srv)
	mount := "approle-" + key
	role := newAppRole(t, root, mount, key, "1h", "1h", true)
	auth := role.auth()
	auth.SecretIDWrapped = true

	var logs syncBuffer
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: auth}, logsTo(&logs))
	if err := encryptOnce(v)(); err != nil {
		t.Fatalf("Encrypt after login: %v", err)
	}

	revokeLogins(t, root, mount)
	if err := encryptOnce(v)(); !errors.Is(err, transit.ErrInvalid) {
		t.Fatalf("Encrypt with the revoked token = %v, want ErrInvalid", err)
	}
	eventually(t, 5*time.Second, "Encrypt after a new login", encryptOnce(v))
	if n := v.Logins(); n != 2 {
		t.Errorf("Logins() = %d, want 2", n)
	}
	t.Logf("logs:\n%s", logs.String())
	if !strings.Contains(logs.String(), "vault no longer accepts the token") {
		t.Error("logs do not say why the service logged in again")
	}
	assertNoLeak(t, logs.String(), role.roleID, role.secretID)

	t.Run("used wrapping token", func(t *testing.T) {
		_, err := transit.NewVault(t.Context(), transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: auth}, nil)
		if !errors.Is(err, transit.ErrInvalid) {
			t.Fatalf("NewVault = %v, want ErrInvalid", err)
		}
		if !strings.Contains(err.Error(), "already unwrapped") {
			t.Errorf("error %q does not explain the failed unwrap", err)
		}
		assertNoLeak(t, err.Error(), role.roleID, role.secretID)
	})

	t.Run("wrapping token from elsewhere", func(t *testing.T) {
		c, err := root.Clone()
		if err != nil {
			t.Fatal(err)
		}
		c.SetToken(srv.RootToken)
		c.SetWrappingLookupFunc(func(string, string) string { return "5m" })
		s := vaultWrite(t, c, "sys/wrapping/wrap", map[string]any{"secret_id": "planted-" + key})
		foreign := auth
		foreign.SecretIDFile = write(t, t.TempDir(), "secret-id", s.WrapInfo.Token)
		_, err = transit.NewVault(t.Context(), transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: foreign}, nil)
		if !errors.Is(err, transit.ErrInvalid) {
			t.Fatalf("NewVault = %v, want ErrInvalid", err)
		}
		if !strings.Contains(err.Error(), "was not created by auth/"+mount+"/role/<role>/secret-id") {
			t.Errorf("error %q does not name the expected creator", err)
		}
		assertNoLeak(t, err.Error(), s.WrapInfo.Token)
	})
}

// When a login fails (here: the secret_id file is gone), the service
// retries with backoff and recovers once the file is back.
func TestVaultAppRoleLoginRetries(t *testing.T) {
	t.Parallel()
	srv := testenv.Vault(t)
	_, key := newKeyedVault(t, srv)
	root := rootClient(t, srv)
	mount := "approle-" + key
	role := newAppRole(t, root, mount, key, "1h", "1h", false)

	var logs syncBuffer
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: role.auth()}, logsTo(&logs))
	moved := role.secretIDFile + ".away"
	if err := os.Rename(role.secretIDFile, moved); err != nil {
		t.Fatal(err)
	}
	revokeLogins(t, root, mount)
	if err := encryptOnce(v)(); !errors.Is(err, transit.ErrInvalid) {
		t.Fatalf("Encrypt with the revoked token = %v, want ErrInvalid", err)
	}
	eventually(t, 5*time.Second, "a failed login", func() error {
		if strings.Count(logs.String(), "vault login failed") < 2 {
			return errors.New("fewer than two failed logins logged")
		}
		return nil
	})
	if err := os.Rename(moved, role.secretIDFile); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "Encrypt after the file is back", encryptOnce(v))
	if n := v.Logins(); n != 2 {
		t.Errorf("Logins() = %d, want 2", n)
	}
	t.Logf("logs:\n%s", logs.String())
	if !strings.Contains(logs.String(), "secret_id file") {
		t.Error("the failed login's log does not name the file")
	}
	assertNoLeak(t, logs.String(), role.roleID, role.secretID)
}

// A request the policy refuses is a 403 like a revoked token's, but the
// token lookup that follows shows the token is fine: no new login.
func TestVaultAppRoleRefusalByPolicy(t *testing.T) {
	t.Parallel()
	srv := testenv.Vault(t)
	_, key := newKeyedVault(t, srv)
	root := rootClient(t, srv)
	role := newAppRole(t, root, "approle-"+key, key, "1h", "1h", false)
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: role.auth()}, nil)
	if err := v.RotateKey(t.Context()); !errors.Is(err, transit.ErrInvalid) {
		t.Fatalf("RotateKey = %v, want ErrInvalid (not in the policy)", err)
	}
	time.Sleep(500 * time.Millisecond) // for the token check, which takes a few ms
	if n := v.Logins(); n != 1 {
		t.Errorf("Logins() = %d after a policy refusal, want 1", n)
	}
	if err := encryptOnce(v)(); err != nil {
		t.Errorf("Encrypt: %v", err)
	}
}

func TestVaultAppRoleRejected(t *testing.T) {
	srv := testenv.Vault(t)
	_, key := newKeyedVault(t, srv)
	root := rootClient(t, srv)
	role := newAppRole(t, root, "approle-"+key, key, "1h", "1h", false)
	dir := t.TempDir()
	wrongRoleID := "0b6d3e2c-wrong-role-id-" + key
	wrongSecretID := "5f1a9c7e-wrong-secret-id-" + key

	tests := []struct {
		name string
		edit func(a *transit.Auth)
		want string
	}{
		{"wrong role_id", func(a *transit.Auth) { a.RoleIDFile = write(t, dir, "wrong-role", wrongRoleID) }, "status 400"},
		{"wrong secret_id", func(a *transit.Auth) { a.SecretIDFile = write(t, dir, "wrong-secret", wrongSecretID) }, "status 400"},
		{"wrong mount", func(a *transit.Auth) { a.MountPath = "no-such-mount" }, "status 40"},
		{"missing file", func(a *transit.Auth) { a.RoleIDFile = filepath.Join(dir, "missing") }, "role_id file"},
		{"empty file", func(a *transit.Auth) { a.SecretIDFile = write(t, dir, "empty", "\n") }, "empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			auth := role.auth()
			tc.edit(&auth)
			_, err := transit.NewVault(t.Context(), transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: auth}, nil)
			if !errors.Is(err, transit.ErrInvalid) {
				t.Fatalf("NewVault = %v, want ErrInvalid", err)
			}
			t.Log(err)
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			assertNoLeak(t, err.Error(), role.roleID, role.secretID, wrongRoleID, wrongSecretID)
		})
	}
}

// fakeKubernetes is a Kubernetes API server that answers TokenReview for
// one service account, as the real one would for its tokens.
type fakeKubernetes struct {
	*httptest.Server
	namespace, name, uid string

	mu       sync.Mutex
	valid    map[string]bool // JWTs the API server issued
	reviewed []string        // JWTs it was asked about
}

func newFakeKubernetes(t *testing.T) *fakeKubernetes {
	t.Helper()
	k := &fakeKubernetes{namespace: "fleetbroker", name: "broker", uid: "2f9c5e4a-0d1b-4c3e-9f8a-" + randomHex(t, 6), valid: map[string]bool{}}
	k.Server = httptest.NewServer(http.HandlerFunc(k.tokenReview))
	t.Cleanup(k.Close)
	return k
}

func (k *fakeKubernetes) tokenReview(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/apis/authentication.k8s.io/v1/tokenreviews" {
		http.NotFound(w, r)
		return
	}
	var review struct {
		Spec struct {
			Token string `json:"token"`
		} `json:"spec"`
	}
	if err := json.NewDecoder(r.Body).Decode(&review); err != nil {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	k.mu.Lock()
	k.reviewed = append(k.reviewed, review.Spec.Token)
	// With no token_reviewer_jwt configured, Vault reviews a JWT with the
	// JWT itself as the bearer token.
	ok := k.valid[review.Spec.Token] && r.Header.Get("Authorization") == "Bearer "+review.Spec.Token
	k.mu.Unlock()
	status := map[string]any{"authenticated": false}
	if ok {
		status = map[string]any{"authenticated": true, "user": map[string]any{
			"username": "system:serviceaccount:" + k.namespace + ":" + k.name,
			"uid":      k.uid,
		}}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status,
	})
}

// issue returns a new service account JWT signed with key, which the fake
// API server accepts if valid.
func (k *fakeKubernetes) issue(t *testing.T, key *rsa.PrivateKey, valid bool) string {
	t.Helper()
	jwt := signJWT(t, key, map[string]any{
		"iss":                                    "kubernetes/serviceaccount",
		"sub":                                    "system:serviceaccount:" + k.namespace + ":" + k.name,
		"jti":                                    randomHex(t, 8),
		"kubernetes.io/serviceaccount/namespace": k.namespace,
		"kubernetes.io/serviceaccount/secret.name":          k.name + "-token",
		"kubernetes.io/serviceaccount/service-account.name": k.name,
		"kubernetes.io/serviceaccount/service-account.uid":  k.uid,
	})
	k.mu.Lock()
	k.valid[jwt] = valid
	k.mu.Unlock()
	return jwt
}

func (k *fakeKubernetes) wasReviewed(jwt string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, j := range k.reviewed {
		if j == jwt {
			return true
		}
	}
	return false
}

// signJWT makes an RS256 JWT.
func signJWT(t *testing.T, key *rsa.PrivateKey, claims map[string]any) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	signed := enc(map[string]string{"alg": "RS256", "typ": "JWT"}) + "." + enc(claims)
	digest := sha256.Sum256([]byte(signed))
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig)
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// Kubernetes auth against the real Vault: Vault hands the service
// account JWT to a (fake) Kubernetes API server's TokenReview, which
// vouches for it. The JWT file is read again at every login, so a rotated
// token is used after the next login.
func TestVaultKubernetesLogin(t *testing.T) {
	t.Parallel()
	srv := testenv.Vault(t)
	_, key := newKeyedVault(t, srv)
	root := rootClient(t, srv)
	k8s := newFakeKubernetes(t)
	enableAuth(t, root, "kubernetes", "kubernetes") // the default mount
	vaultWrite(t, root, "auth/kubernetes/config", map[string]any{
		"kubernetes_host":      k8s.URL,
		"disable_local_ca_jwt": true,
	})
	vaultWrite(t, root, "auth/kubernetes/role/"+key, map[string]any{
		"bound_service_account_names":      []string{k8s.name},
		"bound_service_account_namespaces": []string{k8s.namespace},
		"token_policies":                   []string{encryptPolicy(t, root, key)},
		"token_ttl":                        "1h",
	})
	signer, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	first := k8s.issue(t, signer, true)
	tokenPath := write(t, dir, "token", first)
	auth := transit.Auth{Method: "kubernetes", KubernetesRole: key, KubernetesTokenPath: tokenPath}

	var logs syncBuffer
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: auth}, logsTo(&logs))
	if err := encryptOnce(v)(); err != nil {
		t.Fatalf("Encrypt after login: %v", err)
	}
	if !k8s.wasReviewed(first) {
		t.Fatal("Vault did not review the service account token; did the login go elsewhere?")
	}

	// The kubelet rotates the token; a revoked Vault token makes the
	// service log in again, with the new one.
	rotated := k8s.issue(t, signer, true)
	write(t, dir, "token", rotated)
	revokeLogins(t, root, "kubernetes")
	eventually(t, 5*time.Second, "Encrypt after a new login", encryptOnce(v))
	if !k8s.wasReviewed(rotated) {
		t.Error("the new login did not use the rotated token")
	}
	if n := v.Logins(); n != 2 {
		t.Errorf("Logins() = %d, want 2", n)
	}
	t.Logf("logs:\n%s", logs.String())
	assertNoLeak(t, logs.String(), first, rotated)

	t.Run("token the API server does not vouch for", func(t *testing.T) {
		bad := k8s.issue(t, signer, false)
		auth := auth
		auth.KubernetesTokenPath = write(t, t.TempDir(), "token", bad)
		_, err := transit.NewVault(t.Context(), transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: auth}, nil)
		if !errors.Is(err, transit.ErrInvalid) {
			t.Fatalf("NewVault = %v, want ErrInvalid", err)
		}
		t.Log(err)
		if !strings.Contains(err.Error(), "kubernetes login: status 403") {
			t.Errorf("error %q does not say the login was refused", err)
		}
		assertNoLeak(t, err.Error(), bad)
	})

	t.Run("role it is not bound to", func(t *testing.T) {
		auth := auth
		auth.KubernetesRole = "no-such-role"
		_, err := transit.NewVault(t.Context(), transit.VaultConfig{Addr: srv.Addr, Key: key, Auth: auth}, nil)
		if !errors.Is(err, transit.ErrInvalid) {
			t.Fatalf("NewVault = %v, want ErrInvalid", err)
		}
	})
}

// recordingVault is a fake Vault that records each request's path and
// headers, logs in any AppRole and encrypts anything.
type recordingVault struct {
	*httptest.Server
	mu       sync.Mutex
	requests []recordedRequest
}

type recordedRequest struct {
	path, namespace, token string
}

func newRecordingVault(t *testing.T) *recordingVault {
	t.Helper()
	f := &recordingVault{}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.requests = append(f.requests, recordedRequest{r.URL.Path, r.Header.Get("X-Vault-Namespace"), r.Header.Get("X-Vault-Token")})
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/v1/auth/token/lookup-self":
			fmt.Fprint(w, `{"data":{"renewable":false,"ttl":0}}`)
		case strings.HasSuffix(r.URL.Path, "/login"):
			fmt.Fprint(w, `{"auth":{"client_token":"fake-login-token","policies":["default"],"lease_duration":0,"renewable":false}}`)
		case strings.HasPrefix(r.URL.Path, "/v1/transit/encrypt/"):
			fmt.Fprint(w, `{"data":{"batch_results":[{"ciphertext":"vault:v1:AAAA"}]}}`)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *recordingVault) recorded() []recordedRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recordedRequest(nil), f.requests...)
}

// Vault OSS has no namespaces, so a fake Vault checks that every request,
// the login included, carries the configured namespace, and that
// VAULT_NAMESPACE and VAULT_TOKEN in the environment do not leak in.
func TestVaultNamespaceHeader(t *testing.T) {
	t.Setenv("VAULT_NAMESPACE", "from-the-environment")
	t.Setenv("VAULT_TOKEN", "token-from-the-environment")
	const roleID, secretID = "canary-role-id-5d0c", "canary-secret-id-9e4b"
	dir := t.TempDir()
	approle := transit.Auth{Method: "approle", RoleIDFile: write(t, dir, "r", roleID), SecretIDFile: write(t, dir, "s", secretID)}
	tests := []struct {
		name      string
		cfg       transit.VaultConfig
		namespace string
		paths     []string
		token     string // of the encrypt call
	}{
		{"token", transit.VaultConfig{Token: "configured-token", Namespace: "team-a/fleetbroker"}, "team-a/fleetbroker",
			[]string{"/v1/auth/token/lookup-self", "/v1/transit/encrypt/fleetbroker"}, "configured-token"},
		{"approle", transit.VaultConfig{Auth: approle, Namespace: "team-a"}, "team-a",
			[]string{"/v1/auth/approle/login", "/v1/transit/encrypt/fleetbroker"}, "fake-login-token"},
		{"no namespace", transit.VaultConfig{Auth: approle}, "",
			[]string{"/v1/auth/approle/login", "/v1/transit/encrypt/fleetbroker"}, "fake-login-token"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fake := newRecordingVault(t)
			tc.cfg.Addr = fake.URL
			var logs syncBuffer
			v := newVault(t, tc.cfg, logsTo(&logs))
			if err := encryptOnce(v)(); err != nil {
				t.Fatalf("Encrypt: %v", err)
			}
			assertNoLeak(t, logs.String(), roleID, secretID, "fake-login-token", "configured-token", "token-from-the-environment")
			got := fake.recorded()
			var paths []string
			for _, r := range got {
				paths = append(paths, r.path)
				if r.namespace != tc.namespace {
					t.Errorf("%s: X-Vault-Namespace = %q, want %q", r.path, r.namespace, tc.namespace)
				}
				if r.path != "/v1/transit/encrypt/fleetbroker" && r.path != "/v1/auth/token/lookup-self" && r.token != "" {
					t.Errorf("%s: sent token %q, want none", r.path, r.token)
				}
			}
			if strings.Join(paths, " ") != strings.Join(tc.paths, " ") {
				t.Errorf("requests %v, want %v", paths, tc.paths)
			}
			if last := got[len(got)-1]; last.token != tc.token {
				t.Errorf("Encrypt sent token %q, want %q", last.token, tc.token)
			}
		})
	}
}

// TLS to Vault: the configured CA is trusted (and only it), the server
// name can be overridden, and an AppRole login goes over the same TLS.
func TestVaultCACert(t *testing.T) {
	t.Parallel()
	srv := testenv.VaultTLS(t)
	otherCA := testenv.NewPKI(t).CAFile()
	tests := []struct {
		name       string
		cfg        transit.VaultConfig
		wantErr    error
		wantInText string
	}{
		{"trusted CA", transit.VaultConfig{CACert: srv.CACert}, nil, ""},
		{"server name override", transit.VaultConfig{CACert: srv.CACert, TLSServerName: "localhost"}, nil, ""},
		{"system roots", transit.VaultConfig{}, transit.ErrUnavailable, "certificate"},
		{"another CA", transit.VaultConfig{CACert: otherCA}, transit.ErrUnavailable, "certificate"},
		{"wrong server name", transit.VaultConfig{CACert: srv.CACert, TLSServerName: "vault.example.com"}, transit.ErrUnavailable, "certificate"},
		{"missing CA file", transit.VaultConfig{CACert: filepath.Join(t.TempDir(), "missing.pem")}, transit.ErrInvalid, "CA certificate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.Addr, cfg.Token, cfg.Key = srv.Addr, srv.RootToken, srv.NewKeyName(t)
			v, err := transit.NewVault(t.Context(), cfg, nil)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("NewVault: %v", err)
				}
				defer v.Close()
				if err := v.EnsureKey(t.Context()); err != nil {
					t.Fatalf("EnsureKey over TLS: %v", err)
				}
				// HTTP/2 (which TLS negotiates) once lost response
				// bodies at random; a few calls catch that.
				for range 20 {
					if err := encryptOnce(v)(); err != nil {
						t.Fatalf("Encrypt over TLS: %v", err)
					}
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("NewVault = %v, want %v", err, tc.wantErr)
			}
			t.Log(err)
			if !strings.Contains(err.Error(), tc.wantInText) {
				t.Errorf("error %q does not mention %q", err, tc.wantInText)
			}
		})
	}

	t.Run("approle login", func(t *testing.T) {
		root := rootClient(t, srv)
		key := srv.NewKeyName(t)
		admin := newVault(t, transit.VaultConfig{Addr: srv.Addr, CACert: srv.CACert, Token: srv.RootToken, Key: key}, nil)
		if err := admin.EnsureKey(t.Context()); err != nil {
			t.Fatal(err)
		}
		role := newAppRole(t, root, "approle", key, "1h", "1h", false)
		v := newVault(t, transit.VaultConfig{Addr: srv.Addr, CACert: srv.CACert, Key: key, Auth: role.auth()}, nil)
		if err := encryptOnce(v)(); err != nil {
			t.Errorf("Encrypt: %v", err)
		}
	})
}

// With the token method there is nothing to log in again with: once the
// token can no longer be renewed the service says so at ERROR, and keeps
// saying so after the token is gone.
func TestVaultTokenMethodAtMaxTTL(t *testing.T) {
	t.Parallel()
	srv := testenv.Vault(t)
	_, key := newKeyedVault(t, srv)
	root := rootClient(t, srv)
	s, err := root.Auth().Token().CreateWithContext(t.Context(), &api.TokenCreateRequest{
		Policies:       []string{"default", encryptPolicy(t, root, key)},
		TTL:            "2s",
		ExplicitMaxTTL: "3s",
		Renewable:      new(true),
	})
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	token := s.Auth.ClientToken

	var logs syncBuffer
	v := newVault(t, transit.VaultConfig{Addr: srv.Addr, Token: token, Key: key}, logsTo(&logs))
	eventually(t, 10*time.Second, "the token's end logged", func() error {
		for _, want := range []string{
			"level=ERROR msg=\"vault token cannot be renewed any further; it will expire\"",
			"level=ERROR msg=\"vault token is no longer valid",
		} {
			if !strings.Contains(logs.String(), want) {
				return fmt.Errorf("no %q in the logs", want)
			}
		}
		return nil
	})
	if err := encryptOnce(v)(); !errors.Is(err, transit.ErrInvalid) {
		t.Errorf("Encrypt with the expired token = %v, want ErrInvalid", err)
	}
	if n := v.Logins(); n != 0 {
		t.Errorf("Logins() = %d with the token method, want 0", n)
	}
	start := time.Now()
	if err := v.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Close took %s while the lifecycle goroutine was waiting", d)
	}
	t.Logf("logs:\n%s", logs.String())
	assertNoLeak(t, logs.String(), token)
}
