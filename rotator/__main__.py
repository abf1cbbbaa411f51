from rotator.cli import main

raise SystemExit(main())
