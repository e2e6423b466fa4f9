from s3cryptfs.cli import main

raise SystemExit(main())
