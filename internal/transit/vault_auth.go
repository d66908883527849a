package transit

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/api/auth/approle"
	"github.com/hashicorp/vault/api/auth/kubernetes"
)

// Vault auth methods, the values of Auth.Method.
const (
	AuthToken      = "token"
	AuthAppRole    = "approle"
	AuthKubernetes = "kubernetes"
)

// DefaultKubernetesTokenPath is where Kubernetes mounts a pod's service
// account token.
const DefaultKubernetesTokenPath = "/var/run/secrets/kubernetes.io/serviceaccount/token"

// maxSecretFile caps how much of a role_id, secret_id or JWT file is read.
const maxSecretFile = 64 << 10

// Auth says how the service logs in to Vault. Whatever the method, the
// token is renewed in the background while Vault allows it, and no token,
// secret_id, wrapping token or JWT is ever logged or put in an error.
//
// "token" (the default) uses VaultConfig.Token as it is. When the token
// can no longer be renewed (its max TTL is reached) there is nothing to log
// in again with: the service logs an error, keeps looking the token up
// with backoff and logs each failure, and Vault calls fail once the token
// is gone until the service is restarted with a new one.
//
// "approle" logs in at auth/<MountPath>/login with the role_id in
// RoleIDFile and the secret_id in SecretIDFile. Both files are read again
// at every login, so an operator or an agent may replace them at any time.
// With SecretIDWrapped the secret_id file holds a response-wrapping token
// (vault write -wrap-ttl=... auth/approle/role/<role>/secret-id) instead:
// it is checked to have been created by auth/<MountPath>/role/<role>/secret-id,
// unwrapped once, and the secret_id kept in memory for later logins, since
// a wrapping token works only once; writing a new wrapping token to the
// file replaces it. A wrapping token that does not unwrap was used by
// someone else: treat the secret_id as compromised.
//
// "kubernetes" logs in at auth/<MountPath>/login with KubernetesRole and
// the pod's service account JWT, read from KubernetesTokenPath at every
// login (the kubelet rotates projected tokens).
//
// With approle and kubernetes the service logs in again, retrying with
// backoff, when the token can no longer be renewed (max TTL reached) or
// when Vault refuses a request and a token lookup shows the token is gone
// (revoked).
type Auth struct {
	// Method is "token" (default), "approle" or "kubernetes".
	Method string
	// RoleIDFile and SecretIDFile hold the AppRole role_id and secret_id
	// (approle only; both required). Surrounding white space is ignored.
	RoleIDFile, SecretIDFile string
	// SecretIDWrapped says SecretIDFile holds a response-wrapping token
	// that wraps the secret_id (approle only).
	SecretIDWrapped bool
	// KubernetesRole is the Vault role to log in as (kubernetes only;
	// required).
	KubernetesRole string
	// KubernetesTokenPath is the service account JWT file (kubernetes
	// only); default DefaultKubernetesTokenPath.
	KubernetesTokenPath string
	// MountPath is where the auth method is mounted, without "auth/";
	// default "approle" or "kubernetes" (approle and kubernetes only).
	MountPath string
}

// validate checks that the settings fit the method. token is
// VaultConfig.Token, required by the token method only.
func (a Auth) validate(token string) error {
	method := a.Method
	var missing []string
	switch method {
	case "", AuthToken:
		method = AuthToken
		if token == "" {
			missing = append(missing, "a token")
		}
	case AuthAppRole:
		if a.RoleIDFile == "" {
			missing = append(missing, "a role_id file")
		}
		if a.SecretIDFile == "" {
			missing = append(missing, "a secret_id file")
		}
	case AuthKubernetes:
		if a.KubernetesRole == "" {
			missing = append(missing, "a kubernetes role")
		}
	default:
		return fmt.Errorf("vault transit: %w: unknown auth method %q (want %s, %s or %s)",
			ErrInvalid, a.Method, AuthToken, AuthAppRole, AuthKubernetes)
	}
	if len(missing) > 0 {
		return fmt.Errorf("vault transit: %w: auth method %s needs %s", ErrInvalid, method, strings.Join(missing, " and "))
	}
	if foreign := a.foreignSettings(method); len(foreign) > 0 {
		return fmt.Errorf("vault transit: %w: %s set, but the auth method is %s", ErrInvalid, strings.Join(foreign, ", "), method)
	}
	return nil
}

// foreignSettings names the settings that are set but mean nothing to
// method: most likely the method itself was forgotten.
func (a Auth) foreignSettings(method string) []string {
	settings := []struct {
		set     bool
		name    string
		methods []string
	}{
		{a.RoleIDFile != "", "role_id file", []string{AuthAppRole}},
		{a.SecretIDFile != "", "secret_id file", []string{AuthAppRole}},
		{a.SecretIDWrapped, "secret_id wrapping", []string{AuthAppRole}},
		{a.KubernetesRole != "", "kubernetes role", []string{AuthKubernetes}},
		{a.KubernetesTokenPath != "", "kubernetes token path", []string{AuthKubernetes}},
		{a.MountPath != "", "auth mount path", []string{AuthAppRole, AuthKubernetes}},
	}
	var foreign []string
	for _, s := range settings {
		if s.set && !slices.Contains(s.methods, method) {
			foreign = append(foreign, s.name)
		}
	}
	return foreign
}

func (a Auth) withDefaults() Auth {
	if a.Method == "" {
		a.Method = AuthToken
	}
	a.MountPath = strings.Trim(a.MountPath, "/")
	if a.MountPath == "" && a.Method != AuthToken {
		a.MountPath = a.Method // "approle" or "kubernetes"
	}
	if a.Method == AuthKubernetes && a.KubernetesTokenPath == "" {
		a.KubernetesTokenPath = DefaultKubernetesTokenPath
	}
	return a
}

// loginFunc logs in with c, a client that carries no token, and returns
// the auth secret with the new token.
type loginFunc func(ctx context.Context, c *api.Client) (*api.Secret, error)

// newLogin returns how to log in with a, or nil for the token method.
func newLogin(a Auth) loginFunc {
	switch a.Method {
	case AuthAppRole:
		l := &appRoleLogin{mount: a.MountPath, roleIDFile: a.RoleIDFile, secretIDFile: a.SecretIDFile, wrapped: a.SecretIDWrapped}
		return l.login
	case AuthKubernetes:
		return kubernetesLogin(a.KubernetesRole, a.KubernetesTokenPath, a.MountPath)
	default:
		return nil
	}
}

// appRoleLogin logs in with AppRole. Only one goroutine at a time uses it:
// NewVault, then the lifecycle goroutine.
type appRoleLogin struct {
	mount, roleIDFile, secretIDFile string
	wrapped                         bool

	// With wrapped secret_ids: the secret_id unwrapped from the wrapping
	// token whose SHA-256 is unwrappedFrom.
	secretID      string
	unwrappedFrom [sha256.Size]byte
}

func (l *appRoleLogin) login(ctx context.Context, c *api.Client) (*api.Secret, error) {
	roleID, err := readSecretFile("role_id", l.roleIDFile)
	if err != nil {
		return nil, err
	}
	secretID, err := readSecretFile("secret_id", l.secretIDFile)
	if err != nil {
		return nil, err
	}
	if l.wrapped {
		if secretID, err = l.unwrapped(ctx, c, secretID); err != nil {
			return nil, err
		}
	}
	method, err := approle.NewAppRoleAuth(roleID, &approle.SecretID{FromString: secretID}, approle.WithMountPath(l.mount))
	if err != nil {
		return nil, fmt.Errorf("vault transit approle login: %w: %v", ErrInvalid, err)
	}
	return logInWith(ctx, c, "approle login", method)
}

// unwrapped returns the secret_id wrapped by wrappingToken, unwrapping it
// only the first time the token is seen.
func (l *appRoleLogin) unwrapped(ctx context.Context, c *api.Client, wrappingToken string) (string, error) {
	sum := sha256.Sum256([]byte(wrappingToken))
	if l.secretID != "" && sum == l.unwrappedFrom {
		return l.secretID, nil
	}
	secretID, err := unwrapSecretID(ctx, c, wrappingToken, l.mount)
	if err != nil {
		return "", err
	}
	l.secretID, l.unwrappedFrom = secretID, sum
	return secretID, nil
}

// unwrapSecretID checks that wrappingToken was made by an AppRole
// secret-id endpoint of mount and unwraps it. c must carry no token; it
// carries none afterwards either.
func unwrapSecretID(ctx context.Context, c *api.Client, wrappingToken, mount string) (string, error) {
	const op = "approle secret_id unwrap"
	c.SetToken(wrappingToken)
	defer c.ClearToken()
	info, err := c.Logical().WriteWithContext(ctx, "sys/wrapping/lookup", map[string]any{"token": wrappingToken})
	if err != nil {
		err = apiError(ctx, op, err)
		if errors.Is(err, ErrInvalid) {
			err = fmt.Errorf("%w (the wrapping token is invalid, expired or already unwrapped: "+
				"if this service did not unwrap it, treat the secret_id as compromised)", err)
		}
		return "", err
	}
	if info == nil || !createdBySecretIDEndpoint(fmt.Sprint(info.Data["creation_path"]), mount) {
		return "", fmt.Errorf("vault transit %s: %w: the wrapping token was not created by auth/%s/role/<role>/secret-id", op, ErrInvalid, mount)
	}
	s, err := c.Logical().UnwrapWithContext(ctx, "")
	if err != nil {
		return "", apiError(ctx, op, err)
	}
	var secretID string
	if s != nil {
		secretID, _ = s.Data["secret_id"].(string)
	}
	if secretID == "" {
		return "", fmt.Errorf("vault transit %s: %w: no secret_id in the wrapped response", op, ErrInvalid)
	}
	return secretID, nil
}

// createdBySecretIDEndpoint reports whether a wrapping token's
// creation_path is auth/<mount>/role/<role>/secret-id (or custom-secret-id),
// possibly under a namespace.
func createdBySecretIDEndpoint(path, mount string) bool {
	prefix := "auth/" + mount + "/role/"
	i := strings.Index(path, prefix)
	if i < 0 || (i > 0 && path[i-1] != '/') {
		return false
	}
	role, endpoint, ok := strings.Cut(path[i+len(prefix):], "/")
	return ok && role != "" && (endpoint == "secret-id" || endpoint == "custom-secret-id")
}

// kubernetesLogin logs in with the service account JWT in tokenPath,
// read again at every login.
func kubernetesLogin(role, tokenPath, mount string) loginFunc {
	return func(ctx context.Context, c *api.Client) (*api.Secret, error) {
		jwt, err := readSecretFile("kubernetes service account token", tokenPath)
		if err != nil {
			return nil, err
		}
		method, err := kubernetes.NewKubernetesAuth(role,
			kubernetes.WithServiceAccountToken(jwt), kubernetes.WithMountPath(mount))
		if err != nil {
			return nil, fmt.Errorf("vault transit kubernetes login: %w: %v", ErrInvalid, err)
		}
		return logInWith(ctx, c, "kubernetes login", method)
	}
}

// logInWith logs c in with method and returns the auth secret.
func logInWith(ctx context.Context, c *api.Client, op string, method api.AuthMethod) (*api.Secret, error) {
	s, err := c.Auth().Login(ctx, method)
	switch {
	case err == nil:
		return s, nil
	case s != nil: // an answer without a client token, e.g. MFA required
		return nil, fmt.Errorf("vault transit %s: %w: the response carries no token", op, ErrInvalid)
	default:
		return nil, apiError(ctx, op, err)
	}
}

// readSecretFile returns the trimmed contents of a small file holding a
// credential. Errors name the file, never its contents.
func readSecretFile(what, path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("vault transit: %s file: %w: %v", what, ErrInvalid, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	switch {
	case err != nil:
		return "", fmt.Errorf("vault transit: %s file %s: %w: %v", what, path, ErrInvalid, err)
	case len(data) > maxSecretFile:
		return "", fmt.Errorf("vault transit: %s file %s: %w: larger than %d bytes", what, path, ErrInvalid, maxSecretFile)
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return "", fmt.Errorf("vault transit: %s file %s: %w: empty", what, path, ErrInvalid)
	}
	return s, nil
}

// apiError turns an error of the vault/api client into one of this
// package's: the status code for an error answer, the transport error
// otherwise. Vault's messages are dropped, as everywhere in this file.
func apiError(ctx context.Context, op string, err error) error {
	var re *api.ResponseError
	if errors.As(err, &re) {
		kind := ErrInvalid
		if re.StatusCode >= 500 || re.StatusCode == http.StatusTooManyRequests {
			kind = ErrUnavailable
		}
		return &statusError{op: op, status: re.StatusCode, kind: kind}
	}
	var ue *url.Error
	if ctx.Err() != nil || errors.As(err, &ue) {
		return unavailable(ctx, op, err)
	}
	return fmt.Errorf("vault transit %s: %w: unexpected response", op, ErrUnavailable)
}
