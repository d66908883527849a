package main

import (
	"net"
	"testing"
)

// TestMetricsListenDefaultsToLoopback is finding 12: the services used to
// serve metrics on every interface by default. A scraper on another host
// must now be asked for (--metrics-listen=:9401).
func TestMetricsListenDefaultsToLoopback(t *testing.T) {
	for name, flags := range map[string]func() string{
		"credentials": func() string { fs, _, _, _ := credentialsFlags(); return fs.Lookup("metrics-listen").DefValue },
		"gateway":     func() string { fs, _, _, _ := gatewayFlags(); return fs.Lookup("metrics-listen").DefValue },
	} {
		addr := flags()
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatalf("%s: --metrics-listen default %q: %v", name, addr, err)
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			t.Errorf("%s: --metrics-listen defaults to %q, which is not loopback", name, addr)
		}
	}
}
