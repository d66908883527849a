package launch

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestScrapeMetric(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("# HELP go_goroutines x\ngo_goroutines_total 9\ngo_goroutines 42\n"))
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	if got, err := ScrapeMetric(t.Context(), addr, "go_goroutines"); err != nil || got != 42 {
		t.Fatalf("go_goroutines = %v, %v; want 42", got, err)
	}
	if _, err := ScrapeMetric(t.Context(), addr, "process_open_fds"); err == nil {
		t.Fatal("a missing metric read as a value")
	}
}
