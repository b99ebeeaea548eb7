// Entry point of the console page (a module script: deferred, strict, no globals).

import { setupChat } from './chat.js';
import { setupDeploy } from './deploy.js';
import { StatusFeed } from './feed.js';
import { setupLoad } from './load.js';
import { renderStatus } from './status.js';

const feed = new StatusFeed();
feed.subscribe(renderStatus);
setupDeploy(feed);
setupLoad();
setupChat();
feed.start();
