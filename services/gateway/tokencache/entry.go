package tokencache

import (
	"fmt"
	"io"
	"log/slog"
)

// Entry is a token handed out by GetOrMint. Its fields are unexported and it
// formats itself without the token, so printing, logging or JSON-encoding an
// Entry cannot leak the token; only Token returns it.
type Entry struct {
	key   Key
	token string
	// stored is the sealed value as it was read from or written to Redis.
	// It identifies this token for Invalidate's compare-and-delete and
	// reveals nothing about the token.
	stored string
}

// Token returns the plaintext upstream token (Wialon eid or FleetUp JWT).
// Never log it.
func (e Entry) Token() string { return e.token }

// Key returns the key the token was cached under.
func (e Entry) Key() Key { return e.key }

// String describes the entry without its token.
func (e Entry) String() string {
	return "tokencache.Entry{tenant=" + e.key.Tenant +
		" credential=" + e.key.Credential +
		" generation=" + e.key.Generation +
		" kind=" + e.key.Kind + " token=REDACTED}"
}

// Format makes every fmt verb (%v, %+v, %#v, %s, %q, %x, ...) print String,
// so no verb can reach the token field.
func (e Entry) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, e.String()) }

// LogValue makes slog log the key, never the token.
func (e Entry) LogValue() slog.Value {
	return slog.GroupValue(keyAttrs(e.key)...)
}

// keyAttrs are the log attributes naming a key; none of them is secret.
func keyAttrs(k Key) []slog.Attr {
	return []slog.Attr{
		slog.String("tenant", k.Tenant),
		slog.String("credential", k.Credential),
		slog.String("generation", k.Generation),
		slog.String("kind", k.Kind),
	}
}
