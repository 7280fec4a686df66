from fedmeta.cli import main

raise SystemExit(main())
