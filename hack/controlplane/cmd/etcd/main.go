// Command etcd is the upstream etcd server (the version that k8s.io/kubernetes
// itself requires), for Sidegate's integration tests.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
