// Package keyspace holds the one default of fleetbroker's Redis key
// namespace. Every key a service writes starts with its deployment's prefix
// (--redis-prefix): two deployments sharing one Redis under different
// prefixes share nothing — no records, no locks, no rate budgets. The keys
// themselves are named by the package that owns them (the store, the token
// cache, the rate limiter, ...); the README's "Redis layout" lists them.
//
// It must never hold anything but names: no client, no I/O.
package keyspace

// DefaultPrefix is the prefix of every key when none is configured.
const DefaultPrefix = "fb"

// Prefix returns prefix, or DefaultPrefix when it is empty.
func Prefix(prefix string) string {
	if prefix == "" {
		return DefaultPrefix
	}
	return prefix
}
