// Package tokencache shares upstream session tokens — a Wialon session id
// (eid) or a FleetUp JWT — between every gateway replica through Redis, so
// that the whole fleet logs in to an upstream account once per token
// lifetime, however many callers and replicas ask at the same moment.
//
// # How a token is found or made
//
// GetOrMint first joins any identical request already running in this
// process (singleflight), then reads Redis. On a miss it takes a
// cross-replica lock (SET NX PX); the holder checks Redis again, calls the
// mint function once, stores the token with the TTL the mint function gave,
// and releases the lock by compare-and-delete. Replicas that find the lock
// taken poll Redis until the token appears, or until the lock goes away
// (the holder failed or died), and then try to take the lock themselves.
//
// Invalidate drops a cached token only if Redis still holds the very value
// that failed upstream, so a replica reporting a stale failure cannot throw
// away the token another replica has just minted.
//
// # Key layout
//
//	<prefix>:{<tenant>}:dk                                                 the tenant's wrapped data key
//	<prefix>:{<tenant>}:tok:<credential>:<generation>:<upstream>:<kind>       encrypted token, PX = token TTL
//	<prefix>:{<tenant>}:tok:<credential>:<generation>:<upstream>:<kind>:lock  mint lock, PX = LockTTL
//
// <generation> is the credential's generation id (new on every put, never
// repeated) and <upstream> 128 bits of the SHA-256 of its base URL: a token
// is bound to the exact secret and upstream it was minted for, so no other
// secret's caller — after a rotation, or a delete and re-create under the
// same id — can ever read it. The tenant is the Redis Cluster hash tag, so a
// token, its lock and the data key share a slot. Each Lua script touches
// exactly one key.
//
// # Encryption at rest
//
// Tokens are sealed with AES-256-GCM under a per-tenant data key obtained
// from transit (datakey/wrapped). The wrapped data key is stored in Redis
// with SET NX, so all replicas converge on one; each process unwraps it once
// and keeps the plaintext key only in memory. The GCM associated data is the
// full Redis key name, so a value copied to another key does not decrypt.
//
// A wrapped data key that transit answers "does not decrypt" for — its
// transit key was lost or recreated, or the value was planted — is replaced
// by a fresh one with a compare-and-set, so exactly one replica replaces it
// and the others adopt the winner's; tokens sealed with the old key name its
// id, so they read as misses and are minted again, never opened with the
// new key. A transit that is down or sealed never causes a replacement, and
// a process replaces a tenant's key at most once a minute.
//
// # What this package must never do
//
// It never writes a plaintext token to Redis, a log, an error, a metric or a
// trace. Entry hides its token from fmt, slog and encoding/json; only
// Entry.Token returns it. Mint errors are passed through as the mint function
// made them, so the mint function must keep secrets out of its own errors.
package tokencache
