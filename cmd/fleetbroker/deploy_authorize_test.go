package main

import (
	"context"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
)

// The Wialon authorization callback in deploy/kubernetes: its own Service
// and Ingress, routing only the callback path to the --authorize-listen
// port (never the gRPC port), TLS at the edge and to the pod, the host of
// --public-url, and no access log line that could hold the query string
// (Wialon puts the token there).

type ingress struct {
	Metadata struct {
		Name        string            `yaml:"name"`
		Annotations map[string]string `yaml:"annotations"`
	} `yaml:"metadata"`
	Spec struct {
		IngressClassName string `yaml:"ingressClassName"`
		TLS              []struct {
			Hosts      []string `yaml:"hosts"`
			SecretName string   `yaml:"secretName"`
		} `yaml:"tls"`
		DefaultBackend any `yaml:"defaultBackend"`
		Rules          []struct {
			Host string `yaml:"host"`
			HTTP struct {
				Paths []struct {
					Path     string `yaml:"path"`
					PathType string `yaml:"pathType"`
					Backend  struct {
						Service struct {
							Name string `yaml:"name"`
							Port struct {
								Name   string `yaml:"name"`
								Number int    `yaml:"number"`
							} `yaml:"port"`
						} `yaml:"service"`
					} `yaml:"backend"`
				} `yaml:"paths"`
			} `yaml:"http"`
		} `yaml:"rules"`
	} `yaml:"spec"`
}

// callbackFlags returns the parsed flags of the container running
// `fleetbroker credentials` in d, if any.
func callbackFlags(d *deployment) (get func(string) string, ok bool) {
	for _, c := range d.Spec.Template.Spec.Containers {
		if len(c.Args) == 0 || c.Args[0] != "credentials" {
			continue
		}
		fs := serverFlagSets["credentials"]()
		fs.SetOutput(io.Discard)
		if fs.Parse(c.Args[1:]) != nil {
			return nil, false
		}
		return func(name string) string { return fs.Lookup(name).Value.String() }, true
	}
	return nil, false
}

// targetsCallback reports whether a Service port target of d is the
// credentials container's --authorize-listen port.
func targetsCallback(d *deployment, target intOrString) bool {
	get, ok := callbackFlags(d)
	if !ok || get("authorize-listen") == "" {
		return false
	}
	_, port, err := net.SplitHostPort(get("authorize-listen"))
	if err != nil {
		return false
	}
	for _, c := range d.Spec.Template.Spec.Containers {
		for _, p := range c.Ports {
			if strconv.Itoa(p.ContainerPort) == port && ((target.isInt && target.value == port) || (!target.isInt && target.value == p.Name)) {
				return true
			}
		}
	}
	return false
}

func TestKubernetesAuthorizeIngress(t *testing.T) {
	m := loadManifests(t, manifestDir)
	var ingresses []ingress
	for _, o := range m.objects {
		if o.Kind == "Ingress" {
			var ing ingress
			decodeNode(t, o, &ing)
			ingresses = append(ingresses, ing)
		}
	}
	if len(ingresses) != 1 {
		t.Fatalf("%d Ingresses, want exactly one: the authorization callback's", len(ingresses))
	}
	ing := ingresses[0]
	var creds *deployment
	for i := range m.deployments {
		if _, ok := callbackFlags(&m.deployments[i]); ok {
			creds = &m.deployments[i]
		}
	}
	if creds == nil {
		t.Fatal("no Deployment runs the credentials service")
	}
	get, _ := callbackFlags(creds)
	if get("authorize-listen") == "" {
		t.Fatal("the credentials service has no --authorize-listen: the Ingress leads nowhere")
	}
	public, err := url.Parse(get("public-url"))
	if err != nil || public.Scheme != "https" || public.Host == "" {
		t.Fatalf("--public-url %q: want https://<host>", get("public-url"))
	}
	for _, r := range strings.Split(get("authorize-return-urls"), ",") {
		if u, err := url.Parse(strings.TrimSpace(r)); err != nil || u.Scheme != "https" {
			t.Errorf("--authorize-return-urls entry %q: want https", r)
		}
	}

	if ing.Metadata.Annotations["nginx.ingress.kubernetes.io/enable-access-log"] != "false" {
		t.Error(`the callback's Ingress would write request lines, token included, to the access log: set nginx.ingress.kubernetes.io/enable-access-log: "false"`)
	}
	if ing.Spec.DefaultBackend != nil {
		t.Error("the Ingress has a default backend: only the callback path may be routed")
	}
	tlsHosts := map[string]bool{}
	for _, tls := range ing.Spec.TLS {
		if tls.SecretName == "" {
			t.Error("an Ingress TLS entry without a secretName")
		}
		for _, h := range tls.Hosts {
			tlsHosts[h] = true
		}
	}
	if len(ing.Spec.Rules) == 0 {
		t.Fatal("the Ingress has no rules")
	}
	_, grpcPort, _ := net.SplitHostPort(get("listen"))
	for _, rule := range ing.Spec.Rules {
		if rule.Host != public.Hostname() {
			t.Errorf("Ingress host %q, but --public-url names %q", rule.Host, public.Hostname())
		}
		if !tlsHosts[rule.Host] {
			t.Errorf("Ingress host %q is served without TLS", rule.Host)
		}
		for _, p := range rule.HTTP.Paths {
			if p.Path != "/wialon/callback/" || p.PathType != "Prefix" {
				t.Errorf("Ingress path %q (%s): route only /wialon/callback/ (Prefix)", p.Path, p.PathType)
			}
			svc := p.Backend.Service
			var found bool
			for _, s := range m.services {
				if s.Metadata.Name != svc.Name {
					continue
				}
				found = true
				d, err := m.podsOf(labelSelector{MatchLabels: s.Spec.Selector})
				if err != nil || d != creds {
					t.Errorf("Ingress backend Service %s does not lead to the credentials service: %v", svc.Name, err)
					continue
				}
				for _, sp := range s.Spec.Ports {
					if sp.Name != svc.Port.Name && sp.Port != svc.Port.Number {
						continue
					}
					target := intOrString{isInt: true, value: strconv.Itoa(sp.Port)}
					if sp.TargetPort != nil {
						target = *sp.TargetPort
					}
					if !targetsCallback(d, target) {
						t.Errorf("Ingress reaches Service %s port %d, which is not the --authorize-listen port (gRPC is %s)", svc.Name, sp.Port, grpcPort)
					}
				}
			}
			if !found {
				t.Errorf("Ingress backend Service %q is not in the manifests", svc.Name)
			}
		}
	}
	// The callback serves TLS (--authorize-tls-cert, else --tls-cert), so the
	// controller must speak HTTPS to it.
	if (get("authorize-tls-cert") != "" || get("tls-cert") != "") && ing.Metadata.Annotations["nginx.ingress.kubernetes.io/backend-protocol"] != "HTTPS" {
		t.Error(`the callback serves TLS: set nginx.ingress.kubernetes.io/backend-protocol: "HTTPS"`)
	}
	// No Ingress path ever reaches the gRPC Service.
	for _, s := range m.services {
		for _, p := range s.Spec.Ports {
			if strconv.Itoa(p.Port) == grpcPort {
				for _, rule := range ing.Spec.Rules {
					for _, path := range rule.HTTP.Paths {
						if path.Backend.Service.Name == s.Metadata.Name {
							t.Errorf("the Ingress routes to Service %s, the gRPC port", s.Metadata.Name)
						}
					}
				}
			}
		}
	}
}

// TestComposeAuthorize: docker-compose.yml serves the callback and
// publishes its port, at the address --public-url names.
func TestComposeAuthorize(t *testing.T) {
	opts, err := cli.NewProjectOptions([]string{"../../docker-compose.yml"}, cli.WithWorkingDirectory("../.."), cli.WithName("fleetbroker"), cli.WithOsEnv)
	if err != nil {
		t.Fatal(err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	s, err := project.GetService("credentials")
	if err != nil {
		t.Fatal(err)
	}
	env := func(k string) string {
		if v := s.Environment[k]; v != nil {
			return *v
		}
		return ""
	}
	_, port, err := net.SplitHostPort(env("FLEETBROKER_AUTHORIZE_LISTEN"))
	if err != nil {
		t.Fatalf("FLEETBROKER_AUTHORIZE_LISTEN %q: %v", env("FLEETBROKER_AUTHORIZE_LISTEN"), err)
	}
	public, err := url.Parse(env("FLEETBROKER_PUBLIC_URL"))
	if err != nil || public.Port() == "" {
		t.Fatalf("FLEETBROKER_PUBLIC_URL %q", env("FLEETBROKER_PUBLIC_URL"))
	}
	var published bool
	for _, p := range s.Ports {
		published = published || (strconv.Itoa(int(p.Target)) == port && p.Published == public.Port())
	}
	if !published {
		t.Errorf("the callback port %s is not published as %s, the port of FLEETBROKER_PUBLIC_URL: %v", port, public.Port(), s.Ports)
	}
	if env("FLEETBROKER_AUTHORIZE_RETURN_URLS") == "" {
		t.Error("no FLEETBROKER_AUTHORIZE_RETURN_URLS")
	}
}
