package upstream

import (
	"errors"
	"strings"
	"testing"
)

func TestParseAllowList(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []allowEntry
		wantErr string
	}{
		{name: "empty", in: "", want: nil},
		{name: "blanks ignored", in: " , ,", want: nil},
		{name: "host", in: "Wialon.Example.com", want: []allowEntry{{host: "wialon.example.com"}}},
		{name: "trailing dot", in: "wialon.example.com.", want: []allowEntry{{host: "wialon.example.com"}}},
		{name: "host and port", in: "127.0.0.1:8080", want: []allowEntry{{host: "127.0.0.1", port: "8080"}}},
		{name: "leading zero port", in: "a.example:08080", want: []allowEntry{{host: "a.example", port: "8080"}}},
		{name: "ipv6 with port", in: "[::1]:9000", want: []allowEntry{{host: "::1", port: "9000"}}},
		{name: "ipv6 bracketed", in: "[::1]", want: []allowEntry{{host: "::1"}}},
		{name: "ipv6 bare", in: "::1", want: []allowEntry{{host: "::1"}}},
		{
			name: "several with spaces",
			in:   " a.example , b.example:443 ",
			want: []allowEntry{{host: "a.example"}, {host: "b.example", port: "443"}},
		},
		{name: "scheme", in: "https://a.example", wantErr: "no scheme"},
		{name: "path", in: "a.example/x", wantErr: "no scheme, path"},
		{name: "userinfo", in: "u@a.example", wantErr: "user info"},
		{name: "wildcard", in: "*.example.com", wantErr: "wildcard"},
		{name: "port zero", in: "a.example:0", wantErr: "port must be"},
		{name: "port too big", in: "a.example:65536", wantErr: "port must be"},
		{name: "port not a number", in: "a.example:http", wantErr: "port must be"},
		{name: "empty port", in: "a.example:", wantErr: "empty port"},
		{name: "empty host", in: ":8080", wantErr: "empty host"},
		{name: "one bad entry fails all", in: "a.example, b.example:x", wantErr: `"b.example:x"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseAllowList(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseAllowList(%q) error = %v, want containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseAllowList(%q): %v", tt.in, err)
			}
			if len(got.entries) != len(tt.want) {
				t.Fatalf("entries = %+v, want %+v", got.entries, tt.want)
			}
			for i := range tt.want {
				if got.entries[i] != tt.want[i] {
					t.Errorf("entry %d = %+v, want %+v", i, got.entries[i], tt.want[i])
				}
			}
		})
	}
}

func TestAllowListCheck(t *testing.T) {
	list, err := ParseAllowList("wialon.example.com, 127.0.0.1:8080, [::1]:9000, tls-only.example:8443")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		url     string
		wantErr string // "" = allowed
	}{
		{name: "default wialon", url: DefaultWialonBaseURL},
		{name: "default fleetup", url: DefaultFleetUpBaseURL},
		{name: "default with explicit port", url: "https://api.fleetup.net:443"},
		{name: "default with trailing slash", url: "https://hst-api.wialon.com/"},
		{name: "default case-insensitive", url: "HTTPS://HST-API.Wialon.COM"},
		{name: "default over http refused", url: "http://hst-api.wialon.com", wantErr: "not on the allow-list"},
		{name: "hosted data centre eu", url: "https://hst-api.wialon.eu"},
		{name: "hosted data centre us", url: "https://hst-api.wialon.us"},
		{name: "hosted data centre org", url: "https://hst-api.wialon.org/"},
		{name: "hosted data centre over http refused", url: "http://hst-api.wialon.eu", wantErr: "not on the allow-list"},
		{name: "not a hosted data centre", url: "https://hst-api.wialon.net", wantErr: "not on the allow-list"},
		{name: "default on other port refused", url: "https://api.fleetup.net:8443", wantErr: "not on the allow-list"},
		{name: "listed host any port https", url: "https://wialon.example.com:4443"},
		{name: "listed host http allowed", url: "http://wialon.example.com"},
		{name: "listed host with path", url: "https://wialon.example.com/prefix"},
		{name: "listed host upper case", url: "https://WIALON.example.COM"},
		{name: "listed host trailing dot", url: "https://wialon.example.com."},
		{name: "loopback simulator", url: "http://127.0.0.1:8080"},
		{name: "loopback wrong port", url: "http://127.0.0.1:8081", wantErr: "not on the allow-list"},
		{name: "loopback default port", url: "http://127.0.0.1", wantErr: "not on the allow-list"},
		{name: "ipv6 loopback", url: "http://[::1]:9000"},
		{name: "port entry matches implied port", url: "https://tls-only.example:8443"},
		{name: "unlisted host", url: "https://metadata.google.internal", wantErr: "https://metadata.google.internal is not on the allow-list"},
		{name: "suffix trick", url: "https://wialon.example.com.evil.test", wantErr: "not on the allow-list"},
		{name: "prefix trick", url: "https://evilwialon.example.com", wantErr: "not on the allow-list"},
		{name: "userinfo", url: "https://user:pw@wialon.example.com", wantErr: "user info"},
		{name: "userinfo host confusion", url: `https://hst-api.wialon.com\@evil.test`, wantErr: "not a valid URL"},
		{name: "query", url: "https://wialon.example.com/?token=x", wantErr: "query or fragment"},
		{name: "empty query", url: "https://wialon.example.com/?", wantErr: "query or fragment"},
		{name: "fragment", url: "https://wialon.example.com/#x", wantErr: "query or fragment"},
		{name: "ftp", url: "ftp://wialon.example.com", wantErr: `scheme "ftp"`},
		{name: "file", url: "file:///etc/passwd", wantErr: `scheme "file"`},
		{name: "relative", url: "wialon.example.com", wantErr: "absolute"},
		{name: "opaque", url: "https:wialon.example.com", wantErr: "absolute"},
		{name: "no host", url: "https:///path", wantErr: "absolute"},
		{name: "bad port", url: "https://wialon.example.com:99999", wantErr: "invalid port"},
		{name: "unparsable", url: "https://[::1", wantErr: "not a valid URL"},
		{name: "empty", url: "", wantErr: "absolute"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := list.Check(tt.url)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Check(%q) = %v, want allowed", tt.url, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Check(%q) allowed, want error containing %q", tt.url, tt.wantErr)
			}
			if !errors.Is(err, ErrNotAllowed) {
				t.Errorf("Check(%q) error %v does not wrap ErrNotAllowed", tt.url, err)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Check(%q) = %q, want containing %q", tt.url, err, tt.wantErr)
			}
		})
	}
}

func TestAllowListNilAllowsOnlyDefaults(t *testing.T) {
	var list *AllowList
	if err := list.Check(DefaultWialonBaseURL); err != nil {
		t.Errorf("nil list refused the Wialon default: %v", err)
	}
	if err := list.Check("http://127.0.0.1:8080"); err == nil {
		t.Error("nil list allowed an unlisted loopback URL")
	}
	for _, u := range WialonHostedBaseURLs {
		if err := list.Check(u); err != nil {
			t.Errorf("nil list refused a Wialon data centre: %v", err)
		}
	}
	var zero AllowList
	if err := zero.Check(DefaultFleetUpBaseURL); err != nil {
		t.Errorf("zero list refused the FleetUp default: %v", err)
	}
}

// A base URL may carry a secret in its user info or query; refusals must
// never repeat it.
func TestAllowListErrorsDoNotEchoSecrets(t *testing.T) {
	const secret = "CANARYs3cr3tTOKENvalue"
	list, err := ParseAllowList("wialon.example.com")
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{
		"https://user:" + secret + "@wialon.example.com",
		"https://" + secret + "@wialon.example.com",
		"https://wialon.example.com/?token=" + secret,
		"https://wialon.example.com/#" + secret,
		"https://evil.test/?token=" + secret,
		"https://evil.test/" + secret,
		"gopher://x/" + secret,
		"https://[" + secret,
	} {
		err := list.Check(u)
		if err == nil {
			t.Errorf("Check allowed %q", u)
			continue
		}
		if strings.Contains(err.Error(), secret) {
			t.Errorf("error text %q repeats the secret", err)
		}
	}
}
