package tlsutil

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/filewatch"
	"github.com/fleetbroker/fleetbroker/internal/testenv"
)

// pollOnly disables file notifications, so only polling can reload.
var pollOnly = filewatch.Options{Notify: false, Poll: 20 * time.Millisecond, Settle: 10 * time.Millisecond}

func TestPollingReloadsWithoutNotifications(t *testing.T) {
	pki := testenv.NewPKI(t)
	cert, key := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	r, _, err := newServerConfig(Files{CertFile: cert, KeyFile: key}, nil, pollOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	before := servedSerial(r)

	pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	deadline := time.Now().Add(3 * time.Second)
	for servedSerial(r) == before {
		if time.Now().After(deadline) {
			t.Fatal("polling did not pick up the rotated certificate")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestCloseStopsReloading(t *testing.T) {
	pki := testenv.NewPKI(t)
	cert, key := pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	r, _, err := newServerConfig(Files{CertFile: cert, KeyFile: key}, nil, pollOnly)
	if err != nil {
		t.Fatal(err)
	}
	before := servedSerial(r)
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	pki.Issue(t, "server", testenv.IssueOptions{Server: true})
	time.Sleep(10 * pollOnly.Poll) // long enough for a running poll to notice
	if servedSerial(r) != before {
		t.Error("certificate reloaded after Close")
	}
}

func TestParseCAs(t *testing.T) {
	pkiA, pkiB := testenv.NewPKI(t), testenv.NewPKI(t)
	caA, caB := readTestFile(t, pkiA.CAFile()), readTestFile(t, pkiB.CAFile())
	leafA, key := pkiA.Issue(t, "leaf", testenv.IssueOptions{})
	leafB, _ := pkiB.Issue(t, "leaf", testenv.IssueOptions{})
	bundle := append(bytes.Clone(caA), caB...)

	tests := []struct {
		name     string
		pem      []byte
		wantErr  string   // empty: parses
		verifies []string // certificate files the pool must verify
	}{
		{"one CA", caA, "", []string{leafA}},
		{"bundle of two", bundle, "", []string{leafA, leafB}},
		{"surrounding blank lines", append(append([]byte("\n\n"), caA...), "\n\n"...), "", []string{leafA}},
		{"empty", nil, "no certificate", nil},
		{"second of two truncated", bundle[:len(caA)+len(caB)/2], "not a PEM block", nil},
		{"private key", readTestFile(t, key), "want only CERTIFICATE", nil},
		{"bad DER", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), "CA certificate 1", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pool, err := parseCAs(tt.pem)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("parseCAs: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("parseCAs error = %v, want one containing %q", err, tt.wantErr)
			}
			for _, leaf := range tt.verifies {
				block, _ := pem.Decode(readTestFile(t, leaf))
				cert, err := x509.ParseCertificate(block.Bytes)
				if err != nil {
					t.Fatal(err)
				}
				opts := x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
				if _, err := cert.Verify(opts); err != nil {
					t.Errorf("%s does not verify against the pool: %v", leaf, err)
				}
			}
		})
	}
}

func servedSerial(r *Reloader) string {
	return r.keyPair.current().Leaf.SerialNumber.String()
}

func readTestFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
