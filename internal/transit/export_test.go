package transit

// QueuedItems is how many items of op ("encrypt", "decrypt", "hmac") wait
// for a batch: tests wait on it to know callers are queued.
func QueuedItems(b *Batching, op string) int {
	c := map[string]*coalescer{"encrypt": b.encrypt, "decrypt": b.decrypt, "hmac": b.hmac}[op]
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.queued
}

// Logins is the number of successful logins of v with the configured auth
// method so far, the one in NewVault included; always 0 for the token
// method.
func (v *Vault) Logins() int64 { return v.logins.Load() }
