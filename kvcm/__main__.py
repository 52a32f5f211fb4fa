from kvcm.cli import main

raise SystemExit(main())
