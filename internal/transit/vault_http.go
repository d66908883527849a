package transit

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"
)

// maxVaultResponse caps how much of a Vault response is read, so a broken
// proxy cannot make the broker buffer an unbounded body.
const maxVaultResponse = 64 << 20

// vaultIdleConns is how many idle connections to Vault a client keeps.
const vaultIdleConns = 64

func newVaultClient(cfg VaultConfig) (*api.Client, error) {
	conf := api.DefaultConfig()
	if conf.Error != nil {
		return nil, fmt.Errorf("vault transit: client config: %w", conf.Error)
	}
	conf.Address = cfg.Addr
	conf.Timeout = cfg.Timeout
	// The client retries connection errors, 5xx and 429 (a standby taking
	// over, a blip). Vault's default 1-1.5s backoff would spend most of a
	// 5s budget waiting on a sealed server; shorter waits keep failures
	// fast. Every attempt stays inside the call's timeout.
	conf.MaxRetries = 2
	conf.MinRetryWait = 100 * time.Millisecond
	conf.MaxRetryWait = 500 * time.Millisecond
	if cfg.CACert != "" || cfg.TLSServerName != "" {
		err := conf.ConfigureTLS(&api.TLSConfig{CACert: cfg.CACert, TLSServerName: cfg.TLSServerName})
		if err != nil {
			return nil, fmt.Errorf("vault transit: CA certificate: %w: %v", ErrInvalid, err)
		}
	}
	// Keep a connection for every call that may run at once: the default
	// pool keeps GOMAXPROCS+1 idle connections, so under load (batched
	// transit calls, concurrent puts and batches) every call past that
	// dialled a new connection and closed it after use.
	if t, ok := conf.HttpClient.Transport.(*http.Transport); ok {
		t.MaxIdleConnsPerHost = vaultIdleConns
		t.MaxIdleConns = max(t.MaxIdleConns, vaultIdleConns)
	}
	client, err := api.NewClient(conf)
	if err != nil {
		return nil, fmt.Errorf("vault transit: new client: %w", err)
	}
	// Set explicitly: api.NewClient may have picked up VAULT_TOKEN and
	// VAULT_NAMESPACE from the environment, and the configuration must win.
	client.SetToken(cfg.Token)
	if cfg.Namespace != "" {
		client.SetNamespace(cfg.Namespace)
	} else {
		client.ClearNamespace()
	}
	return client, nil
}

// isForbidden reports a 403 from Vault.
func isForbidden(err error) bool {
	var se *statusError
	return errors.As(err, &se) && se.status == http.StatusForbidden
}

// path returns "<mount>/<endpoint>/<key>".
func (v *Vault) path(endpoint string) string {
	return v.mount + "/" + endpoint + "/" + url.PathEscape(v.key)
}

type encryptItem struct {
	Plaintext      string `json:"plaintext"`
	Context        string `json:"context"`
	AssociatedData string `json:"associated_data,omitempty"`
}

type decryptItem struct {
	Ciphertext     string `json:"ciphertext"`
	Context        string `json:"context"`
	AssociatedData string `json:"associated_data,omitempty"`
}

type hmacItem struct {
	Input string `json:"input"`
}

type batchResult struct {
	Ciphertext string `json:"ciphertext"`
	Plaintext  string `json:"plaintext"`
	HMAC       string `json:"hmac"`
	Error      string `json:"error"`
}

// batch posts batch_input to path (<mount>/<endpoint>/<key>) and returns one
// result per input, in order. Per-item errors are left to the caller,
// because what they mean depends on the operation.
//
// Transit batch endpoints answer 400 when some items failed, with the
// per-item errors in data.batch_results, and also 400 with no data when
// the whole request is refused (e.g. "encryption key not found"); hmac
// answers 200 with the per-item errors.
func (v *Vault) batch(ctx context.Context, op, path string, input any, n int) ([]batchResult, error) {
	r, err := v.send(ctx, op, http.MethodPost, path, map[string]any{"batch_input": input})
	if err != nil {
		return nil, err
	}
	if r.status >= 400 && r.status != http.StatusBadRequest {
		return nil, r.refusal(op)
	}
	var resp struct {
		BatchResults []batchResult `json:"batch_results"`
	}
	if len(r.data) > 0 {
		if err := json.Unmarshal(r.data, &resp); err != nil {
			return nil, fmt.Errorf("vault transit %s: malformed response: %w", op, ErrUnavailable)
		}
	}
	switch {
	case len(resp.BatchResults) == n:
		return resp.BatchResults, nil
	case r.status >= 400:
		return nil, r.refusal(op)
	default:
		return nil, fmt.Errorf("vault transit %s: %d results for %d items: %w", op, len(resp.BatchResults), n, ErrUnavailable)
	}
}

// call sends one request and decodes the response's data object into out
// (unless out is nil). Any 4xx is a refusal: ErrKeyMissing or ErrInvalid.
func (v *Vault) call(ctx context.Context, op, method, path string, body, out any) error {
	r, err := v.send(ctx, op, method, path, body)
	if err != nil {
		return err
	}
	if r.status >= 400 {
		return r.refusal(op)
	}
	if out == nil || len(r.data) == 0 {
		return nil
	}
	if err := json.Unmarshal(r.data, out); err != nil {
		return fmt.Errorf("vault transit %s: malformed response: %w", op, ErrUnavailable)
	}
	return nil
}

// reply is Vault's answer to one request.
type reply struct {
	status int
	// data is the response's "data" object (nil if absent).
	data json.RawMessage
	// keyMissing: Vault said the transit mount or key does not exist.
	keyMissing bool
}

// refusal is the error of a 4xx reply.
func (r reply) refusal(op string) error {
	if r.keyMissing {
		return &statusError{op: op, status: r.status, kind: ErrKeyMissing}
	}
	return &statusError{op: op, status: r.status, kind: ErrInvalid}
}

// Vault's error texts that mean the key is not there: a mount that does not
// exist ("no handler for route …", with 404) and a key that does not exist
// in a mount that does.
const vaultKeyNotFound = "encryption key not found"

// send performs one request, bounded by the configured timeout, and returns
// Vault's reply. No response, 5xx, 429 (rate limited) and 503 (sealed,
// standby) are returned as ErrUnavailable; interpreting 4xx is left to the
// caller.
func (v *Vault) send(ctx context.Context, op, method, path string, body any) (reply, error) {
	start := time.Now()
	r, err := v.sendOnce(ctx, op, method, path, body)
	if v.onCall != nil {
		observed := err
		if observed == nil && r.status >= 400 {
			observed = r.refusal(op)
		}
		v.onCall(op, time.Since(start), observed)
	}
	return r, err
}

// Health reports whether Vault is reachable, initialized and unsealed (a
// standby counts as healthy), for readiness checks.
func (v *Vault) Health(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, v.timeout)
	defer cancel()
	h, err := v.client.Sys().HealthWithContext(ctx)
	if err != nil {
		return unavailable(ctx, "health", err)
	}
	if !h.Initialized || h.Sealed {
		return fmt.Errorf("vault health: initialized=%t sealed=%t: %w", h.Initialized, h.Sealed, ErrUnavailable)
	}
	return nil
}

func (v *Vault) sendOnce(ctx context.Context, op, method, path string, body any) (reply, error) {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return reply{}, fmt.Errorf("vault transit %s: encode request: %w", op, ErrInvalid)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, v.timeout)
	defer cancel()

	// RawRequestWithContext, not Logical().WriteRawWithContext: the latter
	// cancels its context when it returns, before the body is read, which
	// loses the body of HTTP/2 responses (Vault over TLS) at random.
	req := v.client.NewRequest(http.MethodGet, "/v1/"+path)
	if method != http.MethodGet {
		req.Method, req.BodyBytes = http.MethodPut, payload
	}
	resp, err := v.client.RawRequestWithContext(ctx, req)
	if resp == nil {
		return reply{}, unavailable(ctx, op, err)
	}
	defer resp.Body.Close()

	r := reply{status: resp.StatusCode}
	if r.status == http.StatusForbidden {
		v.noteRefusal()
	}
	if r.status >= 500 || r.status == http.StatusTooManyRequests {
		return r, &statusError{op: op, status: r.status, kind: ErrUnavailable}
	}
	// Errors are read only to classify the refusal: they may quote the
	// request, so they never reach an error text or a log.
	var envelope struct {
		Data   json.RawMessage `json:"data"`
		Errors []string        `json:"errors"`
	}
	err = json.NewDecoder(io.LimitReader(resp.Body, maxVaultResponse)).Decode(&envelope)
	switch {
	case err == nil, errors.Is(err, io.EOF): // io.EOF: no body, e.g. 204
	case r.status >= 400:
		return r, nil // an error status says enough
	default:
		return r, fmt.Errorf("vault transit %s: malformed response: %w", op, ErrUnavailable)
	}
	if string(envelope.Data) != "null" {
		r.data = envelope.Data
	}
	transitPath := strings.HasPrefix(path, v.mount+"/")
	r.keyMissing = transitPath && (r.status == http.StatusNotFound || slices.Contains(envelope.Errors, vaultKeyNotFound))
	return r, nil
}

// statusError is a Vault answer with an error status. Its text is only the
// operation and the status code.
type statusError struct {
	op     string
	status int
	kind   error // ErrUnavailable or ErrInvalid
}

func (e *statusError) Error() string {
	return fmt.Sprintf("vault transit %s: status %d: %v", e.op, e.status, e.kind)
}

func (e *statusError) Unwrap() error { return e.kind }

// unavailable describes a request that got no HTTP response. The cause is
// the context's error or the transport error without its URL wrapper; none
// of them carries request data.
func unavailable(ctx context.Context, op string, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("vault transit %s: %w: %w", op, ErrUnavailable, ctxErr)
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	if err == nil {
		err = errors.New("no response")
	}
	return fmt.Errorf("vault transit %s: %w: %w", op, ErrUnavailable, err)
}

// b64 encodes b for Vault's JSON API; nil and empty both give "".
func b64[T ~string | ~[]byte](b T) string {
	return base64.StdEncoding.EncodeToString([]byte(b))
}
